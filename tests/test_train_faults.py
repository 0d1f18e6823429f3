"""Training under faults: SIGTERM and SIGINT save the step reached, a second signal cannot cut
the save short, timed checkpoints bound what a kill -9 loses, and random SIGKILLs (mid-save
too) or a full disk never leave a run that cannot resume."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nmt import checkpoint as ckpt
from nmt.config import ConfigError, load_config
from nmt.train import TrainingInterrupted, train
from nmt.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
QUICK = ["train.log_every=1", "train.test_at_end=false", "train.valid_max_sentences=4"]


def tiny_cfg(corpus: Path, *overrides: str):
    return load_config(TINY, [f"data.corpus={corpus}", "data.src_lang=src", "data.tgt_lang=tgt",
                              *QUICK, *overrides])  # fmt: skip


def cli_args(corpus: Path, run: Path, *overrides: str) -> list[str]:
    sets = [f"data.corpus={corpus}", "data.src_lang=src", "data.tgt_lang=tgt", *QUICK, *overrides]
    return ["train", "--config", str(TINY), "--run-dir", str(run), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def train_records(run: Path) -> list[dict]:
    """The `train` records written so far (a record being written is skipped)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            out.append(record)
    return out


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"training ended early ({proc.returncode})"
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.02)


@pytest.fixture
def unhandled_signals_fail() -> Iterator[None]:
    """Outside training's own handlers a SIGTERM would end pytest; here it fails the test."""

    def fail(signum: int, frame: object) -> None:
        raise RuntimeError(f"{signal.Signals(signum).name} reached no handler of the training")

    previous = {sig: signal.signal(sig, fail) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_sigterm_saves_a_checkpoint_of_the_step_it_reached(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    args = cli_args(toy_translation_dir, run, "train.max_steps=100000", "train.valid_every=100000",
                    "train.save_every_minutes=0")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: len(train_records(run)) >= 3, proc)
        proc.send_signal(signal.SIGTERM)  # as docker stop, Kubernetes and Slurm do
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    found = re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+);", err)
    assert found is not None, err
    step, where = int(found.group(1)), Path(found.group(2))
    assert where == ckpt.latest_checkpoint(run)
    assert ckpt.load_checkpoint_state(where)["loop"]["step"] == step
    assert train_records(run)[-1]["step"] == step  # the step it was at, not one before
    result = train(tiny_cfg(toy_translation_dir, f"train.max_steps={step + 2}",
                            "train.valid_every=100000", "train.save_every_minutes=0"),
                   run, resume=True, progress=False)  # fmt: skip
    assert result.step == step + 2


@pytest.mark.usefixtures("unhandled_signals_fail")
def test_a_second_signal_during_the_save_does_not_cut_it_short(
    toy_translation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import nmt.train as train_module

    real_lr, real_save = train_module.learning_rate, ckpt.save_model

    def learning_rate(step: int, *args, **kwargs):
        if step == 3:  # SIGTERM in the middle of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(step, *args, **kwargs)

    def impatient_save_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    monkeypatch.setattr(ckpt, "save_model", impatient_save_model)
    run = tmp_path / "run"
    cfg = tiny_cfg(toy_translation_dir, "train.max_steps=100", "train.valid_every=1000",
                   "train.save_every_minutes=0")  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, run, progress=False)
    assert (stop.value.signum, stop.value.step, stop.value.exit_code) == (signal.SIGTERM, 3, 143)
    assert stop.value.checkpoint == ckpt.latest_checkpoint(run)
    assert ckpt.load_checkpoint_state(stop.value.checkpoint)["loop"]["step"] == 3
    assert "weight" in "".join(load_file(str(stop.value.checkpoint / ckpt.MODEL_FILE)))
    monkeypatch.undo()
    cfg = tiny_cfg(toy_translation_dir, "train.max_steps=5", "train.valid_every=1000",
                   "train.save_every_minutes=0")  # fmt: skip
    assert train(cfg, run, resume=True, progress=False).step == 5


@pytest.mark.usefixtures("unhandled_signals_fail")
def test_a_signal_during_validation_stops_at_once_with_a_checkpoint(
    toy_translation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import nmt.train as train_module

    def long_validation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
        raise AssertionError("the signal waited for the validation")

    monkeypatch.setattr(train_module, "validate", long_validation)
    run = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_cfg(toy_translation_dir, "train.max_steps=100", "train.valid_every=2"), run,
              progress=False)  # fmt: skip
    assert time.monotonic() - start < 50
    assert (stop.value.step, stop.value.exit_code) == (2, 130)
    assert ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run))["loop"]["step"] == 2


class FakeClock:
    """A clock that moves `tick` seconds every time it is read."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_timed_checkpoints_bound_the_work_a_kill_loses(
    toy_translation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    saves: list[tuple[int, float, bool]] = []
    real = ckpt.save_checkpoint

    def spy(run_dir, step, model, state, keep, before_rename=None, timed=False):
        saves.append((step, state["loop"]["elapsed"], timed))
        return real(run_dir, step, model, state, keep, before_rename, timed)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    run = tmp_path / "run"
    interval = 0.05 * 60  # seconds of the simulated clock
    train(tiny_cfg(toy_translation_dir, "train.max_steps=16", "train.valid_every=10",
                   "train.save_every_minutes=0.05"), run, progress=False, clock=FakeClock())  # fmt: skip
    times = [r["time"] for r in train_records(run)]
    longest_step = max(b - a for a, b in zip([0.0, *times], times)) + 0.1
    assert sum(timed for _, _, timed in saves) >= 3
    elapsed = [0.0] + [e for _, e, _ in saves]
    for before, after in zip(elapsed, elapsed[1:]):
        assert after - before <= interval + longest_step, saves
    # the timed ones gave way to the next checkpoint; the validated one at step 10 is kept
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step-00000010", "step-00000016"]
    with pytest.raises(ConfigError, match="train.save_every_minutes"):
        tiny_cfg(toy_translation_dir, "train.save_every_minutes=-1")


# -- random kills and a full disk (slow) ---------------------------------------------------------

# The CLI with saves that take a little longer, so that kills land inside them more often. Its
# own random generator: the global one belongs to the run, and is saved with its checkpoints.
SLOW_SAVES = """
import random, sys, time
from nmt import checkpoint as ckpt
from nmt.cli import main
jitter, real = random.Random(), ckpt.save_model
def slow_save_model(*args, **kwargs):
    time.sleep(jitter.uniform(0.01, 0.05))
    real(*args, **kwargs)
    time.sleep(jitter.uniform(0.01, 0.05))
ckpt.save_model = slow_save_model
sys.exit(main(sys.argv[1:]))
"""


def saving(run: Path) -> bool:
    """Whether a checkpoint or the model directory is being written (its temporary exists)."""
    return any(p.name.endswith(".tmp") and p.is_dir()
               for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir())  # fmt: skip


@pytest.mark.slow
def test_random_sigkills_lose_at_most_one_save_interval(toy_translation_dir: Path, tmp_path: Path):
    run, script = tmp_path / "run", tmp_path / "slow_saves.py"
    script.write_text(SLOW_SAVES)
    interval = 0.002 * 60
    sets = ["train.max_steps=100000", "train.valid_every=15", "train.keep_checkpoints=2",
            "train.save_every_minutes=0.002"]  # fmt: skip
    rng = random.Random(12)
    kills = mid_save = 0
    last_step = 0
    for attempt in range(22):
        resume = ["--resume"] if attempt else []
        with open(tmp_path / f"attempt-{attempt}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(script), *cli_args(toy_translation_dir,
                                     run, *sets), *resume], cwd=ROOT, stdout=log, stderr=log)  # fmt: skip
            try:
                wait_for(lambda since=last_step: bool(train_records(run))
                         and train_records(run)[-1]["step"] > since, proc)  # fmt: skip
                time.sleep(rng.uniform(0.0, 1.0))
                if attempt % 2:  # every other kill as soon as a save is under way
                    wait_for(lambda: saving(run), proc, seconds=30)
            finally:
                proc.kill()
                proc.wait()
        kills += 1
        records = train_records(run)
        reached = records[-1]
        gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
        mid_save += saving(run)
        ckpt.recover_checkpoints(run)  # what --resume does first
        latest = ckpt.latest_checkpoint(run)
        assert latest is not None, f"attempt {attempt}: no checkpoint"
        state = ckpt.load_checkpoint_state(latest)
        load_file(str(latest / ckpt.MODEL_FILE))
        lost = reached["time"] - state["loop"]["elapsed"]
        assert lost <= interval + 2 * max(gaps, default=0) + 0.2, (attempt, reached, latest)
        assert state["loop"]["step"] >= last_step
        last_step = state["loop"]["step"]
    print(f"{kills} kills, {mid_save} of them during a save")
    assert kills >= 20 and mid_save >= 5, (kills, mid_save)
    done = subprocess.run([sys.executable, "-m", "nmt.cli", *cli_args(toy_translation_dir, run,
                           f"train.max_steps={last_step + 3}", *sets[1:]), "--resume"],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Translator.load(run / "model").translate(["a b"])[0].text is not None


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    sets = ["train.valid_every=3", "train.save_every_minutes=0"]
    first = subprocess.run([sys.executable, "-m", "nmt.cli", *cli_args(toy_translation_dir, run,
                            "train.max_steps=6", *sets)], cwd=ROOT, capture_output=True)  # fmt: skip
    assert first.returncode == 0
    before = ckpt.latest_checkpoint(run)
    weights = (run / "model" / ckpt.MODEL_FILE).read_bytes()
    assert before is not None and len(weights) > 60_000

    def small_disk() -> None:  # files may not grow past 60 kB: the weights do not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process

    full = subprocess.run([sys.executable, "-m", "nmt.cli", *cli_args(toy_translation_dir, run,
                           "train.max_steps=12", *sets), "--resume"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=small_disk)  # fmt: skip
    assert full.returncode > 0, full.stderr
    assert "File too large" in full.stderr
    assert ckpt.latest_checkpoint(run) == before
    assert ckpt.load_checkpoint_state(before)["loop"]["step"] == 6
    assert (run / "model" / ckpt.MODEL_FILE).read_bytes() == weights
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]
    again = subprocess.run([sys.executable, "-m", "nmt.cli", *cli_args(toy_translation_dir, run,
                            "train.max_steps=9", *sets), "--resume"], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run))["loop"]["step"] == 9
