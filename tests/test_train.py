"""Training end to end: learning, checkpoints, resume, crashes, NaN handling, averaging."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nmt import checkpoint as ckpt
from nmt.cli import main
from nmt.config import ConfigError, load_config
from nmt.train import TrainingError, learning_rate, train
from nmt.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_cfg(corpus: Path, *overrides: str):
    return load_config(TINY, [f"data.corpus={corpus}", "data.src_lang=src", "data.tgt_lang=tgt",
                              *overrides])  # fmt: skip


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_tiny_run_learns_and_writes_a_loadable_model(toy_translation_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = train(tiny_cfg(toy_translation_dir, "train.max_steps=120", "train.valid_every=60",
                            "train.log_every=10"), run, progress=False)  # fmt: skip
    losses = [r["loss"] for r in records(run, "train")]
    assert result.step == 120
    if sys.platform == "linux":  # resident memory is logged with every train record
        assert all(r["rss_mb"] > 50 for r in records(run, "train"))
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(records(run, "valid")) == 2
    for name in ("config.yaml", "model.safetensors", "meta.json", "README.md", "spm.model"):
        assert (run / "model" / name).is_file(), name
    assert (run / "curves.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    card = (run / "model" / "README.md").read_text()
    assert "src → tgt" in card and "BLEU signature" in card and "Test BLEU" in card
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert 0.0 <= meta["scores"]["test_bleu"] <= 100.0
    translator = Translator.load(run / "model")
    out = translator.translate(["a b c"], translator.with_options(beam_size=2))
    assert len(out) == 1 and isinstance(out[0].text, str)


def test_resume_follows_the_uninterrupted_loss_trajectory(
    toy_translation_dir: Path, tmp_path: Path
):
    common = ["train.valid_every=15", "train.log_every=3", "model.encoder.dropout=0.2",
              "model.decoder.dropout=0.2", "model.embed_dropout=0.1"]  # fmt: skip
    straight = tmp_path / "straight"
    train(tiny_cfg(toy_translation_dir, "train.max_steps=30", *common), straight, progress=False)
    split = tmp_path / "split"
    train(tiny_cfg(toy_translation_dir, "train.max_steps=15", *common), split, progress=False)
    train(tiny_cfg(toy_translation_dir, "train.max_steps=30", *common), split, resume=True,
          progress=False)  # fmt: skip
    a = [(r["step"], r["loss"]) for r in records(straight, "train")]
    b = [(r["step"], r["loss"]) for r in records(split, "train")]
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)


def test_existing_run_needs_resume_and_lr_change_needs_flag(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    train(tiny_cfg(toy_translation_dir, "train.max_steps=10"), run, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_cfg(toy_translation_dir, "train.max_steps=20"), run, progress=False)
    with pytest.raises(ConfigError, match="train.lr.*--reset-optimizer"):
        train(tiny_cfg(toy_translation_dir, "train.max_steps=20", "train.lr=0.1"), run,
              resume=True, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="model.embed_dim"):
        train(tiny_cfg(toy_translation_dir, "train.max_steps=20", "model.embed_dim=16"), run,
              resume=True, progress=False)  # fmt: skip
    result = train(tiny_cfg(toy_translation_dir, "train.max_steps=20", "train.lr=0.01"), run,
                   resume=True, reset_optimizer=True, progress=False)  # fmt: skip
    assert result.step == 20
    assert load_config(run / "config.yaml").train.lr == 0.01


def test_learning_rate_schedules_are_pure_functions_of_the_step():
    cfg = load_config(TINY, ["train.schedule=inverse_sqrt", "train.warmup_steps=100",
                             "train.lr=0.001", "train.min_lr=0"]).train  # fmt: skip
    assert learning_rate(50, cfg) == pytest.approx(0.0005)
    assert learning_rate(100, cfg) == pytest.approx(0.001)
    assert learning_rate(400, cfg) == pytest.approx(0.0005)
    exp = load_config(TINY, ["train.schedule=exponential", "train.warmup_steps=0", "train.lr=0.001",
                             "train.decay_rate=0.5", "train.decay_steps=10", "train.min_lr=0"]).train  # fmt: skip
    assert learning_rate(20, exp) == pytest.approx(0.00025)
    plateau = load_config(TINY, ["train.schedule=plateau", "train.warmup_steps=0"]).train
    assert learning_rate(7, plateau, plateau_scale=0.5) == pytest.approx(plateau.lr * 0.5)


def test_nan_loss_stops_naming_the_step_or_is_skipped(
    toy_translation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import nmt.train as train_module

    # the training step's loss (the output projection fused with it) turns NaN at step 3
    real = train_module.fused_linear_smoothed_nll
    calls = {"n": 0}

    def poisoned(features, weight, bias, target, pad_id, smoothing, column_of=None):
        loss, nll, n = real(features, weight, bias, target, pad_id, smoothing, column_of)
        if features.requires_grad:
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan"), nll, n
        return loss, nll, n

    monkeypatch.setattr(train_module, "fused_linear_smoothed_nll", poisoned)
    with pytest.raises(TrainingError, match="step 3"):
        train(
            tiny_cfg(toy_translation_dir, "train.max_steps=10"), tmp_path / "stop", progress=False
        )
    calls["n"] = 0
    result = train(tiny_cfg(toy_translation_dir, "train.max_steps=10", "train.nan_policy=skip"),
                   tmp_path / "skip", progress=False)  # fmt: skip
    assert result.step == 10
    state = ckpt.load_checkpoint_state(ckpt.latest_checkpoint(tmp_path / "skip"))
    assert state["loop"]["skipped_batches"] == 1


def test_disk_full_during_save_keeps_the_previous_checkpoint(
    toy_translation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = tmp_path / "run"
    train(tiny_cfg(toy_translation_dir, "train.max_steps=5"), run, progress=False)
    before = ckpt.latest_checkpoint(run)
    assert before is not None

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(run, 99, model, {"x": 1}, keep=5)
    assert ckpt.latest_checkpoint(run) == before
    assert not list((run / "checkpoints").glob(".step-*"))
    assert ckpt.load_checkpoint_state(before)["loop"]["step"] == 5


KILL_SCRIPT = """
import os, sys, torch
from nmt import checkpoint as ckpt
model = torch.nn.Linear(4, 4)
ckpt.save_checkpoint(sys.argv[1], 1, model, {"step": 1}, keep=5)
ckpt.save_checkpoint(sys.argv[1], 2, model, {"step": 2}, keep=5,
                     before_rename=lambda: os._exit(9))
"""


def test_process_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 9
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001"
    assert ckpt.load_checkpoint_state(latest) == {"step": 1}
    assert set(load_file(str(latest / ckpt.MODEL_FILE))) == {"weight", "bias"}


def test_sigkill_during_training_leaves_a_resumable_run(toy_translation_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nmt.cli", "train", "--config", str(TINY), "--run-dir", str(run),
           "--no-progress", "--set", f"data.corpus={toy_translation_dir}", "--set", "data.src_lang=src",
           "--set", "data.tgt_lang=tgt", "--set", "train.max_steps=100000",
           "--set", "train.valid_every=2", "--set", "train.valid_max_sentences=4"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(ckpt.checkpoint_dirs(run)) < 3:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None
    state = ckpt.load_checkpoint_state(latest)
    assert state["loop"]["step"] >= 2
    result = train(tiny_cfg(toy_translation_dir, f"train.max_steps={state['loop']['step'] + 2}",
                            "train.valid_every=2", "train.valid_max_sentences=4"),
                   run, resume=True, progress=False)  # fmt: skip
    assert result.step >= state["loop"]["step"] + 2 - 2  # the newest checkpoint may be a step later


def test_average_of_checkpoints_is_their_mean(toy_translation_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(
        tiny_cfg(toy_translation_dir, "train.max_steps=9", "train.valid_every=3"),
        run,
        progress=False,
    )
    dirs = ckpt.checkpoint_dirs(run)
    assert len(dirs) == 3
    assert main(["average", "--run-dir", str(run), "--last", "2"]) == 0
    avg = load_file(str(run / "model-avg" / ckpt.MODEL_FILE))
    a, b = (load_file(str(d / ckpt.MODEL_FILE)) for d in dirs[-2:])
    assert "output_ids" in avg  # the output vocabulary, the same in both, comes along as is
    for name, tensor in avg.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, a[name]) and torch.equal(tensor, b[name])
            continue
        torch.testing.assert_close(tensor, (a[name].double() + b[name].double()).float() / 2)
    assert Translator.load(run / "model-avg").translate(["a b"])[0].text is not None


DDP_SCRIPT = """
import sys
from nmt.config import load_config
from nmt.train import train
cfg = load_config(sys.argv[1], sys.argv[3:])
train(cfg, sys.argv[2], progress=False)
"""


def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(
    toy_translation_dir: Path, tmp_path: Path
):
    overrides = [f"data.corpus={toy_translation_dir}", "data.src_lang=src", "data.tgt_lang=tgt",
                 "train.max_steps=6", "train.valid_every=6", "train.log_every=1",
                 "train.num_threads=1"]  # fmt: skip
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(script), str(TINY), str(single), *overrides,
                    "train.accum_steps=2"], cwd=ROOT, check=True)  # fmt: skip
    double = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29517", str(script), str(TINY), str(double), *overrides],
                   cwd=ROOT, check=True, env=env)  # fmt: skip
    a = [r["loss"] for r in records(single, "train")]
    b = [r["loss"] for r in records(double, "train")]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)
    wa = load_file(str(ckpt.latest_checkpoint(single) / ckpt.MODEL_FILE))
    wb = load_file(str(ckpt.latest_checkpoint(double) / ckpt.MODEL_FILE))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


DDP_RANK_WEIGHTS_SCRIPT = """
import os, sys, torch
import nmt.train as t
from nmt.config import load_config
finish = t.Trainer.finish
def finish_and_dump(self, stopped):
    torch.save(self.model.state_dict(), os.path.join(sys.argv[2], f"rank{self.info.rank}.pt"))
    finish(self, stopped)
t.Trainer.finish = finish_and_dump
t.train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], progress=False)
"""


def test_two_process_ddp_with_scheduled_sampling_keeps_the_ranks_equal(
    toy_translation_dir: Path, tmp_path: Path
):
    """Scheduled sampling runs through the DDP wrapper, so the ranks' gradients are averaged."""
    overrides = [f"data.corpus={toy_translation_dir}", "data.src_lang=src", "data.tgt_lang=tgt",
                 "train.max_steps=4", "train.valid_every=4", "train.num_threads=1",
                 "train.scheduled_sampling=0.5", "train.scheduled_sampling_steps=1",
                 "train.test_at_end=false", "train.valid_max_sentences=4"]  # fmt: skip
    script = tmp_path / "ddp_ranks.py"
    script.write_text(DDP_RANK_WEIGHTS_SCRIPT)
    run = tmp_path / "ddp-ss"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29518", str(script), str(TINY), str(run), *overrides],
                   cwd=ROOT, check=True, env=env)  # fmt: skip
    w0, w1 = (torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys()
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cli_train_reports_config_errors_before_training(tmp_path: Path, capsys):
    code = main(
        ["train", "--config", str(TINY), "--set", "train.lrate=1", "--run-dir", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.lrate" in err and "valid keys" in err
    code = main(["train", "--config", str(TINY), "--set", "data.corpus=" + str(tmp_path / "nope"),
                 "--run-dir", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


_FREED_HEAP = """
import ctypes.util, sys
from nmt.train_state import release_free_heap, resident_memory_mb
blocks = [bytearray(48 * 1024) for _ in range(6000)]  # ~290 MB of heap blocks under mmap's size
keep = blocks[-1]  # the top block stays live, so free() alone cannot shrink the heap
del blocks
before = resident_memory_mb()
release_free_heap()
print(before, resident_memory_mb())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim, /proc")
def test_freed_heap_goes_back_to_the_os() -> None:
    """What training does once per log window: free heap pages between live blocks are
    returned, so resident memory stops growing over a long run."""
    out = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    before, after = float(out[0]), float(out[1])
    assert before > 250 and after < before - 200, (before, after)


def test_nmt_train_runs_on_jemalloc_where_installed(toy_translation_dir: Path, tmp_path: Path):
    """`nmt train` restarts itself with jemalloc preloaded when the library is there (it keeps
    resident memory flat); NMT_ALLOCATOR=system keeps glibc's; a bad value is a clear error."""
    from nmt.allocator import jemalloc_library

    def run(name: str, allocator: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "nmt.cli", "train", "--config", str(TINY), "--run-dir",
               str(tmp_path / name), "--no-progress", "--set", f"data.corpus={toy_translation_dir}",
               "--set", "data.src_lang=src", "--set", "data.tgt_lang=tgt",
               "--set", "train.max_steps=2", "--set", "train.valid_max_sentences=2"]  # fmt: skip
        env = {**os.environ, "NMT_ALLOCATOR": allocator}
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    system = run("system", "system")
    assert system.returncode == 0, system.stderr
    assert "memory allocator: system" in system.stderr
    bad = run("bad", "tcmalloc")
    assert bad.returncode == 2 and "NMT_ALLOCATOR must be 'jemalloc' or 'system'" in bad.stderr
    if jemalloc_library() is None:
        pytest.skip("jemalloc is not installed (Debian: libjemalloc2)")
    default = run("default", "jemalloc")
    assert default.returncode == 0, default.stderr
    assert "memory allocator: jemalloc" in default.stderr
    assert (tmp_path / "default" / "model" / "model.safetensors").is_file()
