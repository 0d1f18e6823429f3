"""Training against a time budget: the planned schedule, timed validation, EMA, averaging and the
choice of the shipped model, driven by a simulated clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nmt import checkpoint as ckpt
from nmt.config import ConfigError, load_config
from nmt.ema import WeightEMA
from nmt.schedule import learning_rate, warmup_done
from nmt.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


class FakeClock:
    """A clock that moves `tick` seconds every time it is read."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def tiny_cfg(corpus: Path, *overrides: str):
    return load_config(TINY, [f"data.corpus={corpus}", "data.src_lang=src", "data.tgt_lang=tgt",
                              "train.test_at_end=false", "train.max_steps=0", *overrides])  # fmt: skip


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


BUDGET = ["train.schedule=linear", "train.max_minutes=1", "train.warmup_steps=4",
          "train.lr=0.01", "train.min_lr=0.0001", "train.log_every=1"]  # fmt: skip


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_budget_schedule_peaks_after_warmup_and_reaches_the_floor_at_the_deadline(schedule: str):
    tc = load_config(TINY, [f"train.schedule={schedule}", "train.max_minutes=10",
                            "train.warmup_steps=100", "train.lr=0.002",
                            "train.min_lr=0.00001"]).train  # fmt: skip
    assert learning_rate(50, tc) == pytest.approx(0.001)  # warm-up is counted in steps
    warm_end = 60.0  # warm-up took a minute on the clock
    assert learning_rate(101, tc, elapsed=warm_end, warmup_seconds=warm_end) == pytest.approx(0.002)
    middle = (warm_end + 600) / 2
    assert learning_rate(5000, tc, elapsed=middle, warmup_seconds=warm_end) == pytest.approx(
        0.00001 + (0.002 - 0.00001) / 2
    )
    for elapsed in (600.0, 700.0):  # at and past the deadline: the floor, whatever the step
        assert learning_rate(9999, tc, elapsed=elapsed, warmup_seconds=warm_end) == pytest.approx(
            0.00001
        )
    steps = load_config(TINY, [f"train.schedule={schedule}", "train.max_steps=1100",
                               "train.warmup_steps=100", "train.lr=0.002",
                               "train.min_lr=0"]).train  # fmt: skip
    assert learning_rate(1100, steps) == pytest.approx(0.0)  # no budget: max_steps is the end
    assert learning_rate(600, steps) == pytest.approx(0.001)


def test_warmup_under_a_budget_ends_by_a_tenth_of_it_on_a_slow_machine():
    tc = load_config(TINY, ["train.schedule=linear", "train.max_minutes=1", "train.max_steps=0",
                            "train.warmup_steps=1000", "train.lr=0.002"]).train  # fmt: skip
    assert not warmup_done(10, 3.0, tc) and warmup_done(10, 6.0, tc)
    assert learning_rate(10, tc, elapsed=3.0) == pytest.approx(0.001)  # half of the 6 s
    assert learning_rate(10, tc, elapsed=6.0) == pytest.approx(0.002)  # the peak, then decay
    assert learning_rate(11, tc, elapsed=33.0, warmup_seconds=6.0) == pytest.approx(
        tc.min_lr + (0.002 - tc.min_lr) / 2
    )
    steps = load_config(TINY, ["train.schedule=linear", "train.max_steps=5000",
                               "train.warmup_steps=1000", "train.lr=0.002"]).train  # fmt: skip
    assert learning_rate(10, steps, elapsed=1e6) == pytest.approx(0.00002)  # no clock: steps


def test_budget_schedule_needs_an_end_and_ema_decay_is_checked():
    with pytest.raises(ConfigError, match="train.max_minutes or train.max_steps"):
        load_config(TINY, ["train.schedule=cosine", "train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(TINY, ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="train.average_last"):
        load_config(TINY, ["train.average_last=9", "train.keep_checkpoints=3"])
    with pytest.raises(ConfigError, match="train.valid_every_minutes"):
        load_config(TINY, ["train.valid_every_minutes=-1"])
    with pytest.raises(ConfigError, match="data.max_buckets"):
        load_config(TINY, ["data.max_buckets=-2"])
    with pytest.raises(ConfigError, match="train.min_lr"):
        load_config(TINY, ["train.min_lr=0.1", "train.lr=0.01"])


def test_budgeted_run_decays_to_the_floor_exactly_when_the_clock_runs_out(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    train(tiny_cfg(toy_translation_dir, *BUDGET), run, progress=False, clock=FakeClock())
    logged = records(run, "train")
    state = ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run))
    assert state["loop"]["elapsed"] >= 60.0
    assert state["loop"]["warmup_seconds"] > 0
    lrs = [r["lr"] for r in logged]
    assert lrs[3] == pytest.approx(0.01)  # step 4: the peak, right after warm-up
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then only down
    assert lrs[-1] < 0.0001 + 0.01 * 0.1  # within one step's decrement of the floor
    assert logged[-1]["time"] >= 58.0


def test_resumed_budget_run_continues_the_schedule_with_the_clock_spent_before(
    toy_translation_dir: Path, tmp_path: Path
):
    # both validate at step 8, where the first part stops: the same work on the same clock
    common_settings = [*BUDGET, "train.valid_every=8"]
    straight = tmp_path / "straight"
    train(tiny_cfg(toy_translation_dir, *common_settings), straight, progress=False,
          clock=FakeClock(2.0))  # fmt: skip
    split = tmp_path / "split"
    train(tiny_cfg(toy_translation_dir, *common_settings, "train.max_steps=8"), split,
          progress=False, clock=FakeClock(2.0))  # fmt: skip
    spent = ckpt.load_checkpoint_state(ckpt.latest_checkpoint(split))["loop"]["elapsed"]
    assert 16.0 < spent < 60.0
    train(tiny_cfg(toy_translation_dir, *common_settings), split, resume=True, progress=False,
          clock=FakeClock(2.0))  # fmt: skip
    a = {r["step"]: r for r in records(straight, "train")}
    b = {r["step"]: r for r in records(split, "train")}
    # the first step after the resume starts where the clock stood, not at a fresh schedule
    assert b[9]["lr"] < b[8]["lr"] < 0.01
    assert b[9]["lr"] == pytest.approx(a[9]["lr"], rel=0.05)
    common = sorted(set(a) & set(b))
    for step in common:
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=0.05, abs=2e-4), step
    assert abs(max(a) - max(b)) <= 2  # the same deadline, give or take the clock's grain
    assert b[max(b)]["lr"] < 0.0001 + 0.01 * 0.2


def test_timed_validation_costs_at_most_its_share_of_the_clock(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    train(tiny_cfg(toy_translation_dir, *BUDGET, "train.max_minutes=3",
                   "train.valid_every_minutes=0.1"), run, progress=False,
          clock=FakeClock())  # fmt: skip
    valid = records(run, "valid")
    assert len(valid) >= 2
    times = [r["time"] for r in valid]
    # each validation reads the clock a few times, so the interval grows from 6 s to its
    # cost / 5%: validation never takes more than about 5% of the budget
    first_cost = valid[0]["valid_seconds"]
    gaps = [b - a for a, b in zip(times, times[1:-1])]
    assert all(gap >= first_cost / 0.05 - 3 for gap in gaps), (gaps, first_cost)
    assert sum(r["valid_seconds"] for r in valid[:-1]) <= 0.06 * times[-1] + first_cost


def test_ema_equals_a_hand_computed_moving_average():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n])
    for n, p in model.named_parameters():  # the model's own weights are back
        assert torch.equal(p.detach(), weights[n])
    restored = WeightEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5
    for a, b in zip(restored.shadow, ema.shadow):
        assert torch.equal(a, b)


def test_shipped_model_is_the_best_candidate_on_dev_and_the_card_says_which(
    toy_translation_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    train(tiny_cfg(toy_translation_dir, "train.max_steps=40", "train.valid_every=10",
                   "train.ema_decay=0.9", "train.average_last=3"), run,
          progress=False)  # fmt: skip
    meta = json.loads((run / "model" / "meta.json").read_text())
    selection = meta["selection"]
    scores = selection["dev_bleu"]
    assert {"last", "ema", "average of the last 3 checkpoints"} <= set(scores)
    assert scores[selection["chosen"]] == max(scores.values())
    assert meta["weights"] == selection["chosen"]
    card = (run / "model" / "README.md").read_text()
    assert f"| Weights | {selection['chosen']}" in card
    chosen = [r for r in records(run, "select") if r["chosen"]]
    assert [r["candidate"] for r in chosen] == [selection["chosen"]]
    # the shipped weights are the chosen candidate's: for the EMA, the checkpoint's shadow
    state = ckpt.load_checkpoint_state(ckpt.latest_checkpoint(run))
    shipped = ckpt.load_file(str(run / "model" / ckpt.MODEL_FILE))
    name = "decoder.combine.weight"
    if selection["chosen"] == "ema":
        torch.testing.assert_close(shipped[name], state["ema"]["shadow"][name])
    elif selection["chosen"] == "last":
        last = ckpt.load_file(str(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE))
        torch.testing.assert_close(shipped[name], last[name])
    assert state["loop"]["selected"] is True
