"""ONNX export (nmt.export) and the torch-free ONNX Runtime translator (nmt.runtime)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nmt.cli import main
from nmt.config import Config, load_config
from nmt.export import ExportError, check_exportable, export_model, export_onnx
from nmt.model import Seq2Seq, build_model
from nmt.runtime import ExportedModelError, OnnxTranslator
from nmt.runtime.model import OnnxModel, select_rows
from nmt.tokenizer import Tokenizer
from nmt.translate import Translator, decode_options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("exported") / "onnx")


@pytest.fixture(scope="module")
def source_lines(toy_corpus: Path) -> list[str]:
    return (toy_corpus / "test.es").read_text(encoding="utf-8").splitlines()


def _tiny(tokenizer: Tokenizer, *overrides: str) -> tuple[Seq2Seq, Config]:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", list(overrides))
    torch.manual_seed(0)
    model = build_model(
        cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.pad_id
    )
    return model.eval(), cfg


def _assert_steps_match(model: Seq2Seq, onnx: OnnxModel, tokenizer: Tokenizer) -> None:
    """Encoder outputs and three decoder steps (log-probabilities, state, attention) of the
    graphs equal the PyTorch model's within 1e-4, on a padded batch with repeated memory rows
    (as beam search reads it)."""
    ids = tokenizer.encode_src(["El gato come pan hoy.", "La niña ve la luna.", "Hoy."])
    lengths = torch.tensor([len(s) for s in ids])
    src = torch.full((len(ids), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
    for i, seq in enumerate(ids):
        src[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        memory, state = model.encode(src, lengths, src != tokenizer.pad_id)
    onnx_memory, onnx_state = onnx.encode(src.numpy(), lengths.numpy())
    for i, n in enumerate(lengths.tolist()):  # values on padding are unspecified
        np.testing.assert_allclose(
            onnx_memory["enc_out"][i, :n], memory.enc_out[i, :n].numpy(), atol=1e-4
        )
    np.testing.assert_allclose(onnx_state["hidden"], state.hidden.numpy(), atol=1e-4)
    rows = torch.tensor([0, 0, 1, 2])  # two beams of the first sentence
    memory, state = memory.index_select(rows), state.index_select(rows)
    onnx_memory = select_rows(onnx_memory, rows.numpy())
    onnx_state = select_rows(onnx_state, rows.numpy())
    prev = torch.full((4,), tokenizer.bos_id, dtype=torch.long)
    for step_tokens in ([], [7, 9, 11, 13], [5, 6, 7, 8]):
        if step_tokens:
            prev = torch.tensor(step_tokens)
        with torch.no_grad():
            logits, state, attn = model.step(prev, state, memory)
        log_probs, onnx_state, onnx_attn = onnx.step(prev.numpy(), onnx_state, onnx_memory)
        np.testing.assert_allclose(log_probs, logits.log_softmax(-1).numpy(), atol=1e-4)
        np.testing.assert_allclose(onnx_attn, attn.numpy(), atol=1e-4)
        np.testing.assert_allclose(onnx_state["hidden"], state.hidden.numpy(), atol=1e-4)
        if "attn_vector" in onnx_state:
            np.testing.assert_allclose(
                onnx_state["attn_vector"], state.attn_vector.numpy(), atol=1e-4
            )


def _export_and_check(tokenizer: Tokenizer, tmp_path: Path, *overrides: str) -> None:
    model, cfg = _tiny(tokenizer, *overrides)
    options = decode_options(cfg.decode, None)
    out = export_model(model, tokenizer, cfg, {}, options, tmp_path / "onnx")
    translator = OnnxTranslator.load(out)
    _assert_steps_match(model, translator.model, tokenizer)


# -- export: every cell and attention variant ------------------------------------------------


def test_trained_model_steps_match_pytorch(exported_dir: Path, tiny_model_dir: Path) -> None:
    """lstm cells, Luong attention with the general score, restricted output vocabulary."""
    reference = Translator.load(tiny_model_dir)
    assert isinstance(reference.model, Seq2Seq)
    onnx = OnnxTranslator.load(exported_dir)
    _assert_steps_match(reference.model, onnx.model, reference.tokenizer)


def test_gru_bahdanau_additive_steps_match_pytorch(
    toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    _export_and_check(
        toy_tokenizer,
        tmp_path,
        "model.cell=gru",
        "model.attention.type=bahdanau",
        "model.attention.score=additive",
        "model.tie_output=false",
    )


@pytest.mark.slow
def test_lstm_luong_dot_input_feeding_steps_match_pytorch(
    toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    _export_and_check(
        toy_tokenizer,
        tmp_path,
        "model.attention.score=dot",
        "model.decoder.input_feeding=true",
        "model.decoder.hidden_dim=32",
        "model.decoder.residual_from=0",
    )


@pytest.mark.slow
def test_gru_gnmt_concat_bidirectional_steps_match_pytorch(
    toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    _export_and_check(
        toy_tokenizer,
        tmp_path,
        "model.cell=gru",
        "model.attention.type=gnmt",
        "model.attention.score=concat",
        "model.encoder.layout=bi",
    )


@pytest.mark.parametrize("cell", ["lstm_ln", "lstm_peephole", "lstm_cifg"])
def test_custom_cells_are_refused_with_the_reason(toy_tokenizer: Tokenizer, cell: str) -> None:
    model, cfg = _tiny(toy_tokenizer, f"model.cell={cell}")
    with pytest.raises(ExportError, match=f"cell '{cell}' cannot be exported.*Python loop"):
        check_exportable(model, cfg)


# -- the runtime decodes as the PyTorch search does ------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"beam_size": 1},
        {"beam_size": 3, "n_best": 2},
        {"beam_size": 4, "length_penalty": 1.0, "coverage_penalty": 0.3, "no_repeat_ngram": 2},
        {"beam_size": 1, "coverage_penalty": 0.2, "min_len": 3, "max_len_b": 4.0},
    ],
    ids=["greedy", "beam-nbest", "beam-penalties", "greedy-limits"],
)
def test_exported_output_equals_pytorch_output(
    exported_dir: Path, tiny_model_dir: Path, source_lines: list[str], changes: dict[str, float]
) -> None:
    reference = Translator.load(tiny_model_dir)
    onnx = OnnxTranslator.load(exported_dir)
    assert onnx.options == reference.options  # the model's decoding rules travel with it
    options = replace(reference.options, **changes)
    expected = reference.translate(source_lines, options)
    got = onnx.translate(source_lines, options)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.finished for r in got] == [r.finished for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert [t for t, _ in a.n_best] == [t for t, _ in b.n_best]
        np.testing.assert_allclose([s for _, s in a.n_best], [s for _, s in b.n_best], atol=1e-3)


def test_attention_comes_back_as_in_pytorch(exported_dir: Path, tiny_model_dir: Path) -> None:
    reference = Translator.load(tiny_model_dir)
    onnx = OnnxTranslator.load(exported_dir)
    options = replace(reference.options, beam_size=2, return_attention=True)
    [expected] = reference.translate(["El perro ve la luna."], options)
    [got] = onnx.translate(["El perro ve la luna."], options)
    assert got.src_tokens == expected.src_tokens and got.tgt_tokens == expected.tgt_tokens
    np.testing.assert_allclose(got.attention or [], expected.attention or [], atol=1e-4)


def test_runtime_refuses_what_it_does_not_implement(exported_dir: Path) -> None:
    onnx = OnnxTranslator.load(exported_dir)
    with pytest.raises(ValueError, match="sampling is not implemented in the ONNX runtime"):
        onnx.translate(["Hoy."], replace(onnx.options, beam_size=1, sampling="topk"))
    with pytest.raises(ValueError, match="target prefixes are not implemented"):
        onnx.translate(["Hoy."], prefixes=["The"])
    with pytest.raises(ValueError, match="token streaming is not implemented"):
        onnx.translate_stream("Hoy.", on_text=print)


def test_runtime_translates_with_torch_unimportable(
    exported_dir: Path, tiny_model_dir: Path, source_lines: list[str]
) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from nmt.runtime import OnnxTranslator
        translator = OnnxTranslator.load(sys.argv[1])
        lines = json.loads(sys.stdin.read())
        print(json.dumps([r.text for r in translator.translate(lines)]))
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules
                       if sys.modules[m] is not None)
        """
    )
    lines = source_lines[:10]
    done = subprocess.run(
        [sys.executable, "-c", script, str(exported_dir)],
        input=json.dumps(lines),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = [r.text for r in Translator.load(tiny_model_dir).translate(lines)]
    assert json.loads(done.stdout) == expected


def test_runtime_command_runs_with_a_torch_that_fails_to_import(
    exported_dir: Path, tmp_path: Path, source_lines: list[str]
) -> None:
    """`python -m nmt.runtime` as a deployment without PyTorch runs it: a `torch` package that
    raises on import comes first on the path."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    src = tmp_path / "in.es"
    src.write_text("".join(line + "\n" for line in source_lines[:8]), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "nmt.runtime", "--model", str(exported_dir), "--input", str(src),
         "--beam-size", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={"PYTHONPATH": f"{blocker.parent}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    onnx = OnnxTranslator.load(exported_dir)
    expected = onnx.translate(source_lines[:8], replace(onnx.options, beam_size=2))
    assert done.stdout.splitlines() == [r.text for r in expected]


# -- the directory, the CLI and the service --------------------------------------------------


def test_a_missing_file_gives_a_clear_error(exported_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exported_dir, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(ExportedModelError, match="decoder.onnx is missing"):
        OnnxTranslator.load(broken)
    (broken / "spm.model").unlink()
    (broken / "export.json").unlink()
    with pytest.raises(ExportedModelError, match="export.json is missing"):
        OnnxTranslator.load(broken)


def test_cli_export_and_translate_detect_the_format(
    tiny_model_dir: Path, exported_dir: Path, toy_corpus: Path, tmp_path: Path, capsys
) -> None:
    src = toy_corpus / "test.es"
    assert main(["translate", "--model", str(tiny_model_dir), "--input", str(src),
                 "--output", str(tmp_path / "torch.en"), "--beam-size", "3"]) == 0  # fmt: skip
    assert main(["translate", "--model", str(exported_dir), "--input", str(src),
                 "--output", str(tmp_path / "onnx.en"), "--beam-size", "3"]) == 0  # fmt: skip
    assert (tmp_path / "onnx.en").read_text() == (tmp_path / "torch.en").read_text()
    assert main(["translate", "--model", str(exported_dir), "--precision", "bf16"]) == 2
    assert "exported (ONNX) model" in capsys.readouterr().err
    # nmt export refuses a model directory with a missing file, naming it
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    assert main(["export", "--model", str(broken), "--out", str(tmp_path / "x")]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err


def test_int8_export_translates_close_to_fp32(
    tiny_model_dir: Path, exported_dir: Path, source_lines: list[str], tmp_path: Path
) -> None:
    """Also a second export of one model in one process: its source length stays dynamic."""
    int8_dir = export_onnx(tiny_model_dir, tmp_path / "int8", int8=True)
    assert json.loads((int8_dir / "export.json").read_text())["precision"] == "int8"
    fp32, int8 = OnnxTranslator.load(exported_dir), OnnxTranslator.load(int8_dir)
    a = [r.text for r in fp32.translate(source_lines)]
    b = [r.text for r in int8.translate(source_lines)]
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 0.8 * len(a)


def test_service_serves_an_exported_directory(exported_dir: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import settings_from

    app = create_app(settings_from(model_dir=str(exported_dir)))
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        r = client.post("/v1/translate", json={"text": "El gato come pan hoy."})
        assert r.status_code == 200, r.text
    expected = Translator.load(tiny_model_dir).translate(["El gato come pan hoy."])[0].text
    assert r.json()["translations"][0]["text"] == expected
