"""Shared fixtures: a toy Spanish-English corpus, a tiny SentencePiece model, copy/reverse tasks.

Built once per test session in a temporary folder:

- `toy_corpus`: Path of `toy-es-en/` with `{train,dev,test}.{es,en}` (300/30/30 pairs of short
  generated sentences, `El gato come pan hoy.` / `The cat eats bread today.`) and a manifest.
- `toy_tokenizer`: a joint unigram SentencePiece `Tokenizer` trained on its training split
  (vocabulary size 64, as in configs/tiny.yaml); `toy_tokenizer_dir` is its folder.
- `copy_corpus` / `reverse_corpus`: Paths of generated symbol-sequence tasks in the same layout,
  languages `src`/`tgt` (`d a f` -> `d a f`, or `f a d`); `make_task_corpus(out_dir, ...)`
  writes one with other settings (also importable as `write_task_corpus`).
- `toy_translation_dir`: an easier copy task (8 symbols, 1-6 long) for training-loop tests.
- `tiny_model_dir`: configs/tiny.yaml trained 150 steps on the toy corpus (es -> en), the model
  directory of that run (for translator and service tests).

After every test the gate math and loss are back on plain tensor code (`use_kernels("eager")`):
a training run selects the C++ kernels for the process, and a test must not depend on which
tests ran before it.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from nmt.config import TokenizerConfig
from nmt.corpus import write_corpus
from nmt.model.cells import use_kernels
from nmt.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _eager_kernels_after_each_test() -> Iterator[None]:
    yield
    use_kernels("eager")


TOY_SRC_LANG, TOY_TGT_LANG = "es", "en"
TASK_SRC_LANG, TASK_TGT_LANG = "src", "tgt"

_SUBJECTS = [
    ("el gato", "the cat"),
    ("el perro", "the dog"),
    ("la niña", "the girl"),
    ("el hombre", "the man"),
    ("la mujer", "the woman"),
    ("mi amigo", "my friend"),
]
_VERBS = [
    ("come", "eats"),
    ("ve", "sees"),
    ("quiere", "wants"),
    ("tiene", "has"),
    ("busca", "looks for"),
]
_OBJECTS = [
    ("pan", "bread"),
    ("agua", "water"),
    ("una casa", "a house"),
    ("un libro", "a book"),
    ("la luna", "the moon"),
    ("flores", "flowers"),
]
_TIMES = [("hoy", "today"), ("mañana", "tomorrow"), ("ahora", "now"), ("", "")]  # fmt: skip


def toy_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """All 720 generated Spanish-English sentence pairs, shuffled reproducibly."""
    pairs = []
    for parts in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TIMES):
        es = " ".join(p[0] for p in parts if p[0])
        en = " ".join(p[1] for p in parts if p[1])
        pairs.append((es[0].upper() + es[1:] + ".", en[0].upper() + en[1:] + "."))
    random.Random(seed).shuffle(pairs)
    return pairs


def write_toy_corpus(out_dir: Path, n_train: int = 300, n_dev: int = 30, n_test: int = 30) -> Path:
    """Writes the toy Spanish-English corpus folder and returns it."""
    pairs = toy_pairs()
    assert n_train + n_dev + n_test <= len(pairs)
    write_corpus(
        out_dir,
        {
            "train": pairs[:n_train],
            "dev": pairs[n_train : n_train + n_dev],
            "test": pairs[n_train + n_dev : n_train + n_dev + n_test],
        },
        TOY_SRC_LANG,
        TOY_TGT_LANG,
        source="generated toy sentences (tests)",
    )
    return out_dir


def write_task_corpus(
    out_dir: Path,
    task: str = "copy",
    n_train: int = 500,
    n_dev: int = 50,
    n_test: int = 50,
    *,
    num_symbols: int = 20,
    min_len: int = 3,
    max_len: int = 12,
    seed: int = 0,
    src_lang: str = TASK_SRC_LANG,
    tgt_lang: str = TASK_TGT_LANG,
) -> Path:
    """Writes a synthetic task corpus: random sequences of lower-case letters separated by spaces,
    the target being the same sequence (`copy`) or the reversed one (`reverse`)."""
    if task not in ("copy", "reverse"):
        raise ValueError(f"task must be 'copy' or 'reverse', got {task!r}")
    rng = random.Random(seed)
    symbols = list(string.ascii_lowercase[:num_symbols])

    def pairs(n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            seq = [rng.choice(symbols) for _ in range(rng.randint(min_len, max_len))]
            out.append((" ".join(seq), " ".join(seq if task == "copy" else seq[::-1])))
        return out

    write_corpus(
        out_dir,
        {"train": pairs(n_train), "dev": pairs(n_dev), "test": pairs(n_test)},
        src_lang,
        tgt_lang,
        source=f"generated {task} task (tests)",
    )
    return out_dir


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("data") / "toy-es-en")


@pytest.fixture(scope="session")
def toy_tokenizer_dir(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy-tokenizer")
    Tokenizer.train(
        toy_corpus / "train.es",
        toy_corpus / "train.en",
        out,
        TokenizerConfig(vocab_size=64, model_type="unigram", joint=True),
    )
    return out


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(toy_tokenizer_dir)


@pytest.fixture(scope="session")
def copy_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_corpus(tmp_path_factory.mktemp("data") / "copy", "copy")


@pytest.fixture(scope="session")
def reverse_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_corpus(tmp_path_factory.mktemp("data") / "reverse", "reverse")


@pytest.fixture
def make_task_corpus() -> Callable[..., Path]:
    """`write_task_corpus(out_dir, task="copy", n_train=500, ...)`, for tests that need another."""
    return write_task_corpus


@pytest.fixture(scope="session")
def toy_translation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus folder (languages `src`/`tgt`) that configs/tiny.yaml starts to learn within about
    100 steps: copying sequences of 1 to 6 of 8 symbols."""
    out = tmp_path_factory.mktemp("data") / "toy-translation"
    return write_task_corpus(out, "copy", num_symbols=8, min_len=1, max_len=6)


@pytest.fixture(scope="session")
def tiny_model_dir(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory: configs/tiny.yaml trained briefly on the toy Spanish-English corpus."""
    from nmt.config import load_config
    from nmt.train import train

    config = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    cfg = load_config(config, [f"data.corpus={toy_corpus}", "data.src_lang=es",
                               "data.tgt_lang=en", "train.max_steps=150",
                               "train.valid_every=150", "train.valid_max_sentences=10"])  # fmt: skip
    run = tmp_path_factory.mktemp("tiny-run")
    train(cfg, run, progress=False)
    return run / "model"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, so tolerance checks do not depend on thread splits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
