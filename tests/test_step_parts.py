"""benchmarks/step_parts.py runs every variant of the step and puts each piece back afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nmt import loss as nmt_loss
from nmt.model import dropout, encoder, input_feeding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import step_parts  # noqa: E402


def test_step_parts_times_every_piece_and_restores_the_modules(capsys: pytest.CaptureFixture[str]):
    before = (input_feeding.lstm_step, input_feeding._Products.per_row, encoder.lstm_on_kernels,
              nmt_loss.native, nmt_loss.WHOLE_GRAD_BYTES, dropout.native)  # fmt: skip
    step_parts.main(["--batch-tokens", "64", "--length", "8", "--iters", "1", "--warmup", "0"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["tokens_per_s"]) == {"full", *step_parts.PIECES}
    assert all(speed > 0 for speed in result["tokens_per_s"].values())
    assert all(result[f"speedup_{piece}"] > 0 for piece in step_parts.PIECES)
    after = (input_feeding.lstm_step, input_feeding._Products.per_row, encoder.lstm_on_kernels,
             nmt_loss.native, nmt_loss.WHOLE_GRAD_BYTES, dropout.native)  # fmt: skip
    assert after == before
