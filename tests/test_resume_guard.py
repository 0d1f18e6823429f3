"""Resuming never mixes two runs, and saves survive kills: a torn metrics line, a changed
tokenizer, corpus or config are caught; directories are swapped in whole and recovered after a
kill mid-swap; timed checkpoints never displace validated ones."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nmt import checkpoint as ckpt
from nmt.config import Config, ConfigError, TokenizerConfig, load_config, save_config
from nmt.tokenizer import Tokenizer
from nmt.train import TOKENIZER_STAMP, TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
QUICK = ["train.valid_every=3", "train.log_every=1", "train.test_at_end=false",
         "train.valid_max_sentences=4", "train.save_every_minutes=0"]  # fmt: skip


def tiny_cfg(corpus: Path, *overrides: str):
    return load_config(TINY, [f"data.corpus={corpus}", "data.src_lang=src", "data.tgt_lang=tgt",
                              *QUICK, *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def base_run(toy_translation_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A corpus copy and a run on it, trained 3 steps; tests copy the run before changing it."""
    root = tmp_path_factory.mktemp("guard")
    corpus = root / "corpus"
    shutil.copytree(toy_translation_dir, corpus)
    train(tiny_cfg(corpus, "train.max_steps=3"), root / "run", progress=False)
    return corpus, root / "run"


def copy_run(base_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    corpus, run = base_run
    shutil.copytree(run, tmp_path / "run")
    return corpus, tmp_path / "run"


def test_torn_last_metrics_line_is_dropped_and_a_corrupt_middle_line_is_named(
    base_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    corpus, run = copy_run(base_run, tmp_path)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # the disk filled up mid-record
    result = train(tiny_cfg(corpus, "train.max_steps=5"), run, resume=True, progress=False)
    assert result.step == 5
    assert "torn last record" in caplog.text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 5

    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingError, match=r"metrics.jsonl, line 2"):
        train(tiny_cfg(corpus, "train.max_steps=6"), run, resume=True, progress=False)


def test_resume_compares_the_config_stored_in_the_checkpoint(
    base_run: tuple[Path, Path], tmp_path: Path
):
    corpus, run = copy_run(base_run, tmp_path)
    changed = tiny_cfg(corpus, "train.max_steps=5", "train.betas=[0.8, 0.9]")
    # as a run restarted with --reset-optimizer and killed before its first checkpoint leaves it
    save_config(changed, run / "config.yaml")
    with pytest.raises(ConfigError, match=r"train.betas.*--reset-optimizer"):
        train(changed, run, resume=True, progress=False)
    result = train(changed, run, resume=True, reset_optimizer=True, progress=False)
    assert result.step == 5


def test_resume_refuses_a_tokenizer_other_than_the_checkpoints(
    base_run: tuple[Path, Path], tmp_path: Path
):
    corpus, run = copy_run(base_run, tmp_path)
    other = Tokenizer.train(corpus / "dev.src", corpus / "dev.tgt", tmp_path / "other",
                            load_config(TINY).tokenizer)  # fmt: skip
    model = run / "tokenizer" / "spm.model"
    assert other.files[0].read_bytes() != model.read_bytes()
    shutil.copyfile(other.files[0], model)
    with pytest.raises(TrainingError, match=r"SentencePiece model.*spm.model"):
        train(tiny_cfg(corpus, "train.max_steps=5"), run, resume=True, progress=False)


def test_resume_refuses_changed_training_data_under_the_same_path(
    base_run: tuple[Path, Path], tmp_path: Path
):
    corpus, run = copy_run(base_run, tmp_path)
    originals = {side: (corpus / f"train.{side}").read_text() for side in ("src", "tgt")}
    try:
        for side, text in originals.items():  # the same lines, two swapped: the same batches
            lines = text.splitlines()
            lines[0], lines[1] = lines[1], lines[0]
            (corpus / f"train.{side}").write_text("\n".join(lines) + "\n")
        with pytest.raises(TrainingError, match=r"training data \(.*train.src"):
            train(tiny_cfg(corpus, "train.max_steps=5"), run, resume=True, progress=False)
    finally:
        for side, text in originals.items():
            (corpus / f"train.{side}").write_text(text)


def test_a_fresh_start_retrains_a_tokenizer_left_with_other_settings(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    left = Tokenizer.train(toy_translation_dir / "train.src", toy_translation_dir / "train.tgt",
                           run / "tokenizer", TokenizerConfig(model_type="bpe", vocab_size=40))  # fmt: skip
    before = left.files[0].read_bytes()
    cfg = tiny_cfg(toy_translation_dir, "train.max_steps=1", "train.valid_every=1")
    train(cfg, run, progress=False)  # no checkpoint yet: a fresh start
    assert (run / "tokenizer" / "spm.model").read_bytes() != before
    stamp = json.loads((run / "tokenizer" / TOKENIZER_STAMP).read_text())
    assert stamp["tokenizer"]["model_type"] == cfg.tokenizer.model_type == "unigram"


# -- durable, atomic directories -----------------------------------------------------------------


def write_model(model_dir: Path, tokenizer_dir: Path, name: str, weight: float) -> None:
    model = nn.Linear(2, 2)
    nn.init.constant_(model.weight, weight)
    files = Tokenizer.load(tokenizer_dir).files
    ckpt.write_model_dir(model_dir, model, Config(name=name), files, {"name": name}, f"# {name}")


def test_a_failed_model_dir_rewrite_leaves_the_old_one_whole(
    toy_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model_dir = tmp_path / "model"
    write_model(model_dir, toy_tokenizer_dir, "old", 1.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_model", full)
    with pytest.raises(OSError, match="No space"):
        write_model(model_dir, toy_tokenizer_dir, "new", 2.0)
    assert load_config(model_dir / "config.yaml").name == "old"
    assert json.loads((model_dir / "meta.json").read_text()) == {"name": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


KILL_BETWEEN_RENAMES = """
import os, sys, torch
from pathlib import Path
from nmt import checkpoint as ckpt
from nmt.config import Config
from nmt.tokenizer import Tokenizer
run, tok = Path(sys.argv[1]), Tokenizer.load(sys.argv[2])
model = torch.nn.Linear(2, 2)
ckpt.save_checkpoint(run, 1, model, {"step": 1}, keep=5)
ckpt.save_checkpoint(run, 2, model, {"version": "old"}, keep=5)
ckpt.write_model_dir(run / "model", model, Config(name="old"), tok.files, {"name": "old"})
ckpt._exchange = lambda a, b: False  # where the system has no atomic exchange
real = os.replace
def killed_after_the_old_one_is_moved_away(src, dst):
    if Path(src).name.endswith(".tmp"):
        os._exit(9)
    real(src, dst)
ckpt.os.replace = killed_after_the_old_one_is_moved_away
if sys.argv[3] == "checkpoint":
    ckpt.save_checkpoint(run, 2, model, {"version": "new"}, keep=5)
else:
    ckpt.write_model_dir(run / "model", model, Config(name="new"), tok.files, {"name": "new"})
"""


@pytest.mark.parametrize("target", ["checkpoint", "model"])
def test_a_kill_between_the_two_renames_of_a_swap_is_recovered(
    target: str, toy_tokenizer_dir: Path, tmp_path: Path
):
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(tmp_path),
                           str(toy_tokenizer_dir), target], cwd=ROOT)  # fmt: skip
    assert proc.returncode == 9
    if target == "checkpoint":
        assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"  # step 2 is moved away
        ckpt.recover_checkpoints(tmp_path)
        latest = ckpt.latest_checkpoint(tmp_path)
        assert latest is not None and latest.name == "step-00000002"
        assert ckpt.load_checkpoint_state(latest) == {"version": "old"}
    else:
        assert not (tmp_path / "model").exists()
        _, meta = ckpt.read_model_dir(tmp_path / "model")  # loading puts the old copy back
        assert meta == {"name": "old"}
        assert not ckpt.recover_dir(tmp_path / "model")  # nothing left to repair
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".gitignore"]


def test_resaving_a_step_replaces_it_whole_and_syncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 2, model, {"version": "old"}, keep=5)
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    with pytest.raises(RuntimeError):

        def fail() -> None:
            raise RuntimeError("killed before the swap")

        ckpt.save_checkpoint(tmp_path, 2, model, {"version": "new"}, keep=5, before_rename=fail)
    assert ckpt.load_checkpoint_state(ckpt.latest_checkpoint(tmp_path)) == {"version": "old"}
    ckpt.save_checkpoint(tmp_path, 2, model, {"version": "new"}, keep=5)
    assert ckpt.load_checkpoint_state(ckpt.latest_checkpoint(tmp_path)) == {"version": "new"}
    assert (tmp_path / "checkpoints").stat().st_ino in synced  # the rename made durable
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_timed_checkpoints_give_way_to_the_next_and_never_displace_validated_ones(tmp_path: Path):
    model = nn.Linear(2, 2)

    def save(step: int, timed: bool) -> None:
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2, timed=timed)

    def kept() -> list[tuple[str, bool]]:
        return [(p.name[-2:], ckpt.is_timed(p)) for p in ckpt.checkpoint_dirs(tmp_path)]

    save(10, timed=False)
    save(20, timed=False)
    save(23, timed=True)
    save(26, timed=True)
    assert kept() == [("20", False), ("26", True)]
    save(30, timed=False)
    assert kept() == [("20", False), ("30", False)]
    save(30, timed=True)  # a signal right after a validation: the step stays a validated one
    assert kept() == [("20", False), ("30", False)]
    assert torch.equal(
        ckpt.load_file(str(ckpt.latest_checkpoint(tmp_path) / ckpt.MODEL_FILE))["weight"],
        model.weight.detach(),
    )
