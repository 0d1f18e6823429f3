import time
from pathlib import Path
def test_tiny(tiny_model_dir: Path) -> None:
    print(sorted(p.name for p in tiny_model_dir.iterdir()))
    from nmt.translate import Translator
    t = Translator.load(tiny_model_dir)
    print(t.translate(["El gato come pan hoy.", "La mujer busca una casa."]))
