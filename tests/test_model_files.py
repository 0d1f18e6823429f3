"""Broken model files: every command that loads a model says which file is wrong, in one line;
`nmt average` reports the averaged weights' own scores or says they are unscored."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from nmt import checkpoint as ckpt
from nmt.cli import main


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def run_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny run's model and checkpoints (two of them: the last one, twice)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (last,) = ckpt.checkpoint_dirs(tiny_model_dir.parent)[-1:]
    shutil.copytree(last, run / "checkpoints" / last.name)
    shutil.copytree(last, run / "checkpoints" / "step-00000001")
    return run


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def first_half_only(path: Path) -> None:
    """A config cut between sections, which still parses as YAML."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.index("\nmodel:")] + "\n", encoding="utf-8")


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff" * 300)


BREAKAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated weights": (ckpt.MODEL_FILE, truncate, "truncated"),
    "garbage weights": (ckpt.MODEL_FILE, garbage, "truncated or not a safetensors file"),
    "missing weights": (ckpt.MODEL_FILE, Path.unlink, "is missing"),
    "missing config": (ckpt.CONFIG_FILE, Path.unlink, "is missing"),
    "invalid config": (ckpt.CONFIG_FILE, lambda p: p.write_text("model: [\n"), "not valid YAML"),
    "cut config": (ckpt.CONFIG_FILE, first_half_only, "incomplete"),
    "empty config": (ckpt.CONFIG_FILE, lambda p: p.write_text(""), "empty"),
    "binary config": (ckpt.CONFIG_FILE, garbage, "cannot read"),
    "truncated meta": (ckpt.META_FILE, truncate, "not valid JSON"),
    "missing tokenizer": ("spm.model", Path.unlink, "no SentencePiece model"),
    "corrupt tokenizer": ("spm.model", truncate, "cannot read SentencePiece model"),
}


def assert_one_line_error(code: int, err: str, name: str, what: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert name in lines[0] and what in lines[0], err


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_model_dir_is_one_clear_error_in_translate_and_evaluate(
    breakage: str, model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, damage, what = BREAKAGES[breakage]
    damage(model_copy / name)
    src = tmp_path / "in.es"
    src.write_text("El gato come pan.\n", encoding="utf-8")
    capsys.readouterr()
    code = main(["translate", "--model", str(model_copy), "--input", str(src)])
    assert_one_line_error(code, capsys.readouterr().err, name, what)
    code = main(["evaluate", "--model", str(model_copy), "--src", str(src), "--ref", str(src)])
    assert_one_line_error(code, capsys.readouterr().err, name, what)


def test_read_model_dir_raises_model_file_error_a_value_error(model_copy: Path) -> None:
    truncate(model_copy / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.ModelFileError, match="model.safetensors is truncated") as err:
        ckpt.read_model_dir(model_copy)
    assert isinstance(err.value, ValueError) and isinstance(err.value, ckpt.CheckpointError)


def test_weights_with_nan_are_corrupt(model_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    from nmt.translate import Translator

    weights = load_file(str(model_copy / ckpt.MODEL_FILE))
    name = next(n for n, t in weights.items() if t.is_floating_point())
    weights[name][0] = float("nan")
    save_file(weights, str(model_copy / ckpt.MODEL_FILE))
    with pytest.raises(ckpt.ModelFileError, match=f"{name} holds NaN"):
        Translator.load(model_copy)


def test_weights_of_another_shape_name_the_tensor(model_copy: Path) -> None:
    from nmt.translate import Translator

    cfg = yaml.safe_load((model_copy / ckpt.CONFIG_FILE).read_text(encoding="utf-8"))
    cfg["model"]["decoder"]["hidden_dim"] = 48
    (model_copy / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ckpt.ModelFileError, match=r"does not fit the model .*decoder.*has shape"):
        Translator.load(model_copy)


def test_average_over_a_truncated_checkpoint_names_it(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = ckpt.checkpoint_dirs(run_copy)[0] / ckpt.MODEL_FILE
    truncate(broken)
    code = main(["average", "--run-dir", str(run_copy), "--last", "2"])
    assert_one_line_error(code, capsys.readouterr().err, str(broken), "truncated")
    assert not (run_copy / "model-avg").exists()


def test_averaged_model_reports_its_own_dev_scores(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = json.loads((run_copy / "model" / ckpt.META_FILE).read_text(encoding="utf-8"))
    assert shipped["selection"]["chosen"] == "last"  # the weights of the last checkpoint
    out = run_copy / "avg"
    assert main(["average", "--run-dir", str(run_copy), "--last", "2", "--out", str(out)]) == 0
    assert "dev BLEU" in capsys.readouterr().out
    meta = json.loads((out / ckpt.META_FILE).read_text(encoding="utf-8"))
    assert meta["averaged_from"] == ["step-00000001", "step-00000150"]
    assert "selection" not in meta and "unscored" not in meta
    assert set(meta["scores"]) >= {"dev_bleu", "dev_chrf", "bleu_signature"}
    assert "test_bleu" not in meta["scores"]  # the shipped model's test score is not ours
    # the mean of two copies of the last checkpoint is the shipped model: the same validation
    # must give the same score that training recorded
    assert meta["scores"]["dev_bleu"] == pytest.approx(shipped["scores"]["dev_bleu"], abs=1e-9)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "average of checkpoints step-00000001, step-00000150" in card
    assert f"{meta['scores']['dev_bleu']:.2f}" in card


def test_averaged_model_without_its_dev_split_says_it_is_unscored(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_copy / "model" / ckpt.CONFIG_FILE
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["data"]["corpus"] = str(run_copy / "gone")
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = run_copy / "avg"
    assert main(["average", "--run-dir", str(run_copy), "--last", "2", "--out", str(out)]) == 0
    assert "unscored" in capsys.readouterr().out
    meta = json.loads((out / ckpt.META_FILE).read_text(encoding="utf-8"))
    assert meta["scores"] == {} and "selection" not in meta
    assert meta["unscored"] == "averaged from checkpoints step-00000001, step-00000150"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "unscored: averaged from checkpoints step-00000001, step-00000150" in card
    assert "nan" not in card
    src = run_copy / "in.es"
    src.write_text("El gato come pan.\n", encoding="utf-8")
    assert main(["translate", "--model", str(out), "--input", str(src)]) == 0  # it loads
