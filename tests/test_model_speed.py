"""benchmarks/model_speed.py's profile: the matrix products' FLOPs and their share of the step."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nmt.config import load_config
from nmt.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import model_speed  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_product_flops_by_hand() -> None:
    flops = model_speed._product_flops
    assert flops("aten::mm", [[3, 4], [4, 5]]) == 2 * 3 * 4 * 5
    assert flops("aten::addmm", [[5], [3, 4], [4, 5], [], []]) == 2 * 3 * 4 * 5
    assert flops("aten::bmm", [[2, 3, 4], [2, 4, 5]]) == 2 * 2 * 3 * 4 * 5
    assert flops("aten::baddbmm", [[2, 3, 5], [2, 3, 4], [2, 4, 5], [], []]) == 2 * 2 * 3 * 4 * 5
    assert flops("aten::add", [[3, 4], [3, 4]]) == 0


def test_profile_counts_the_step_products_as_torch_flop_counter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The profile's products of a tiny model's bf16 step add up to torch's own FLOP count of
    the same step (both count matrix products only), and take part of the step's time."""
    cfg = load_config(CONFIGS / "tiny.yaml", [])
    torch.manual_seed(0)
    model = build_model(cfg.model, 64, 64, model_speed.PAD)
    batch = model_speed.synthetic_batch(64, 256, 8, torch.Generator().manual_seed(0))
    step = model_speed.train_step_fn(model, batch, "bf16")
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    model_speed.profile_train_step("tiny", model, batch)
    line = capsys.readouterr().err.splitlines()[-1]
    found = re.search(
        r"matrix products ([\d.]+) ms of a ([\d.]+) ms step .* ([\d.]+) GFLOP at", line
    )
    assert found, line
    products_ms, step_ms, gflop = (float(x) for x in found.groups())
    assert 0 < products_ms < step_ms
    assert gflop * 1e9 == pytest.approx(counter.get_total_flops(), rel=0.02)
