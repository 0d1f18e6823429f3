"""Our recurrence layer (nmt/model/cells.py): its gradients, each cell in every model layout,
recurrent dropout, config checks, and models saved before it existed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import test_model as tm
import torch

from nmt.config import (
    ConfigError,
    ModelConfig,
    config_from_dict,
    encoder_output_dim,
    load_config,
    replace,
)
from nmt.model import build_model, count_parameters
from nmt.model.cells import CELLS, CUSTOM_CELLS, GATES, RecurrentLayer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMBOS = list(itertools.product(CUSTOM_CELLS, tm.ATTENTIONS, tm.LAYOUTS))
STEP_VARIANTS = [
    *COMBOS,
    *[(cell, "luong-general-feed", layout) for cell in CUSTOM_CELLS for layout in tm.LAYOUTS],
]

one_thread = tm.one_thread  # the autouse fixture


def combo_id(combo: tuple[str, ...]) -> str:
    return "-".join(combo)


@pytest.mark.parametrize("kind", list(GATES))
def test_hand_written_backward_matches_finite_differences(kind: str):
    torch.manual_seed(0)
    layer = RecurrentLayer(kind, 5, 4).double()
    with torch.no_grad():  # away from the initial values, so that every term matters
        for param in layer.parameters():
            param.add_(torch.empty_like(param).uniform_(-0.5, 0.5))
    x = torch.randn(3, 6, 5, dtype=torch.double, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    c0 = torch.randn(1, 3, 4, dtype=torch.double, requires_grad=True)
    h_mask = (torch.rand(3, 4, dtype=torch.double) > 0.3).double() / 0.7

    def run(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *params: Any) -> Any:
        out, (_, c) = layer(x, (h0, c0), noise=(h_mask, None))
        return out, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *layer.parameters()), atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_lstm_on_our_layer_matches_nn_lstm(precision: str):
    torch.manual_seed(0)
    reference = torch.nn.LSTM(6, 5, batch_first=True)
    ours = RecurrentLayer("lstm", 6, 5)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 6)
    h0, c0 = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if precision == "fp32" else {"atol": 0.03, "rtol": 0.03}
    results = []
    for layer in (reference, ours):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out, (h, c) = layer(x, (h0, c0))
        (out.float().square().sum() + c.float().sum()).backward()
        results.append([out.float(), h.float(), c.float(), *(p.grad for p in layer.parameters())])
    for theirs, mine in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, **tol)


def test_layer_normalised_lstm_in_bf16_follows_fp32():
    # under bf16 autocast lstm_ln's products run in bf16 and its gate math in fp32: outputs
    # and gradients within bf16 rounding of the fp32 computation
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm_ln", 16, 32)
    x = torch.randn(4, 9, 16)
    results = []
    for bf16 in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out, (_, c) = layer(x)
        (out.float().square().sum() + c.float().sum()).backward()
        results.append([out.float(), c.float(), *(p.grad.clone() for p in layer.parameters())])
    for ref, low in zip(*results, strict=True):
        scale = float(ref.abs().max())
        torch.testing.assert_close(low, ref, atol=0.02 * scale, rtol=0.02)


def test_every_lstm_variant_starts_with_forget_bias_one():
    for kind in GATES:
        layer = RecurrentLayer(kind, 4, 3)
        total = layer.bias_ih_l0 + layer.bias_hh_l0
        forget = slice(0, 3) if kind == "lstm_cifg" else slice(3, 6)
        assert torch.all(total[forget] == 1.0), kind


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_padding_does_not_change_a_sentences_outputs(combo: tuple[str, str, str]):
    tm.test_padding_does_not_change_a_sentences_outputs(combo)


@pytest.mark.parametrize("combo", STEP_VARIANTS, ids=combo_id)
def test_step_loop_gives_the_teacher_forced_logits(combo: tuple[str, str, str]):
    tm.test_step_loop_gives_the_teacher_forced_logits(combo)


@pytest.mark.parametrize(
    "combo",
    [
        (c, a, lay)
        for c in CUSTOM_CELLS
        for a, lay in [("gnmt", "bi"), ("luong-general", "gnmt"), ("bahdanau", "gnmt")]
    ],
    ids=combo_id,
)
def test_gradients_reach_every_parameter(combo: tuple[str, str, str]):
    regularise = {"dropout": 0.1, "dropout_recurrent": 0.2, "weight_drop": 0.2}
    model = tm.make_model(*combo, encoder=regularise, decoder=regularise).train()
    batch = tm.toy_batch(torch.Generator().manual_seed(2), batch=6)
    logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    loss, _, _ = tm.label_smoothed_nll(logits, batch["tgt_out"], tm.PAD, 0.1)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert any("peephole" in n or "ln_" in n for n in names) or combo[0] == "lstm_cifg"
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("cell", CUSTOM_CELLS)
def test_tiny_model_with_each_cell_learns_to_reverse_token_strings(cell: str):
    model = tm.make_model(cell, "luong-general", "gnmt", enc_hidden=16)
    losses = tm.train_toy(model, steps=150)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert start > 2.5  # about log(16) at initialisation
    assert end < 0.3 * start, (start, end)


def cell_params(cell: str, input_dim: int, hidden: int) -> int:
    """Closed forms, both bias vectors counted as PyTorch keeps them."""
    if cell == "gru":
        return 3 * (hidden * hidden + hidden * input_dim + hidden) + 3 * hidden
    lstm = 4 * (hidden * hidden + hidden * input_dim + hidden) + 4 * hidden
    if cell == "lstm_peephole":
        return lstm + 3 * hidden  # p_i, p_f, p_o
    if cell == "lstm_cifg":
        return 3 * (hidden * hidden + hidden * input_dim + hidden) + 3 * hidden
    if cell == "lstm_ln":
        return lstm + 4 * hidden + 4 * hidden + 2 * hidden  # LN(W_x x), LN(W_h h) gains; LN(c)
    return lstm


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_counts_match_the_closed_form(cell: str):
    cfg = tm.model_config(cell, "luong-general", "gnmt", share_embeddings=False)
    counts = count_parameters(build_model(cfg, 20, 30, tm.PAD))
    e, h_enc, h_dec = cfg.embed_dim, cfg.encoder.hidden_dim, cfg.decoder.hidden_dim
    rnn = lambda i, h: cell_params(cell, i, h)  # noqa: E731
    assert counts["encoder"] == 2 * rnn(e, h_enc) + rnn(2 * h_enc, h_enc) + rnn(h_enc, h_enc)
    assert counts["decoder"] == rnn(e, h_dec) + rnn(h_dec, h_dec)
    states = 1 if cell == "gru" else 2
    enc_dim = encoder_output_dim(cfg)
    assert counts["bridge"] == enc_dim * states * 2 * h_dec + states * 2 * h_dec


def regularised_model(cell: str = "lstm_cifg", **decoder: Any) -> Any:
    values = {"dropout": 0.0, "dropout_recurrent": 0.5, **decoder}
    return tm.make_model(cell, "luong-general", "gnmt", decoder=values)


def test_recurrent_dropout_keeps_one_mask_for_all_steps_of_a_sequence():
    model = regularised_model(variational=True, dropout=0.3).train()
    batch = tm.toy_batch(torch.Generator().manual_seed(3), batch=5)
    memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
    assert memory.noise is not None
    h_mask = memory.noise.recurrent[0].h_mask
    assert h_mask is not None and h_mask.shape == (5, model.decoder.hidden_dim)
    assert set(h_mask.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    # two steps one at a time give what the whole sequence gives with the same memory: the
    # masks of step 2 are those of step 1 (recurrent and between-layer alike)
    emb = model.target_embedding(batch["tgt_in"][:, :2])
    whole, _ = model.decoder(emb, state, memory)
    first, state1, _ = model.decoder.step(emb[:, 0], state, memory)
    second, _, _ = model.decoder.step(emb[:, 1], state1, memory)
    torch.testing.assert_close(torch.stack([first, second], 1), whole)
    # a new batch draws new masks
    other, _ = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
    assert other.noise is not None
    assert not torch.equal(other.noise.recurrent[0].h_mask, h_mask)


def test_recurrent_dropout_and_weight_drop_are_off_in_eval_mode():
    model = regularised_model(weight_drop=0.5).eval()
    batch = tm.toy_batch(torch.Generator().manual_seed(4), batch=3)
    args = (batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    memory, _ = model.encode(*args[:3])
    assert memory.noise is None
    layer = model.decoder.layers[0]
    assert layer.sample_noise(3, batch["src"]) is None
    with torch.no_grad():
        torch.testing.assert_close(model(*args), model(*args))
    model.train()
    noise = layer.sample_noise(3, batch["src"])
    assert noise is not None and noise.w_mask is not None
    assert noise.w_mask.shape == layer.weight_hh_l0.shape


def test_noise_rows_follow_the_batch_in_memory_index_select():
    model = regularised_model().train()
    batch = tm.toy_batch(torch.Generator().manual_seed(5), batch=4)
    memory, _ = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
    idx = torch.tensor([3, 3, 0])
    picked = memory.index_select(idx)
    assert picked.noise is not None and memory.noise is not None
    torch.testing.assert_close(
        picked.noise.recurrent[1].h_mask, memory.noise.recurrent[1].h_mask[idx]
    )


def config_with(**model: Any) -> ModelConfig:
    values: dict[str, Any] = {"model": model}
    return config_from_dict(values).model


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"cell": "lstm_layernorm"}, "model.cell"),
        ({"cell": "lstm", "encoder": {"weight_drop": 0.2}}, "model.encoder.weight_drop"),
        ({"cell": "gru", "decoder": {"dropout_recurrent": 0.1}}, "model.decoder.dropout_recurrent"),
        (
            {"cell": "lstm_ln", "decoder": {"dropout_recurrent": 1.0}},
            "model.decoder.dropout_recurrent",
        ),
        ({"cell": "lstm_cifg", "encoder": {"weight_drop": -0.1}}, "model.encoder.weight_drop"),
    ],
)
def test_configs_that_cannot_work_are_refused_naming_the_field(model: dict[str, Any], field: str):
    with pytest.raises(ConfigError, match=field):
        config_with(**model)


def test_config_cells_are_the_cells_the_model_builds():
    for cell in CELLS:
        assert config_with(cell=cell).cell == cell
    assert (
        config_with(cell="lstm_ln", decoder={"dropout_recurrent": 0.3}).decoder.dropout_recurrent
        == 0.3
    )


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_models_saved_before_our_cells_load_and_translate_identically(cell: str):
    saved = torch.load(FIXTURES / f"before_cells_{cell}.pt", weights_only=False)
    model = build_model(config_from_dict({"model": saved["config"]}).model, 16, 16, tm.PAD)
    model.load_state_dict(saved["model"])  # strict: the same keys as before
    model.eval()
    batch = saved["batch"]
    with torch.no_grad():
        logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
        memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
        tokens = torch.full((4,), tm.BOS)
        greedy = []
        for _ in range(6):
            out, state, _ = model.step(tokens, state, memory)
            tokens = out.argmax(-1)
            greedy.append(tokens)
    torch.testing.assert_close(logits, saved["logits"], atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.stack(greedy, 1), saved["greedy"])


@pytest.mark.parametrize("cell", ["lstm_ln", "lstm_peephole", "lstm_cifg", "gru"])
def test_per_cell_bible_configs_differ_from_the_default_only_in_the_cell(cell: str):
    default = load_config(tm.CONFIGS / "bible-es-en.yaml")
    cfg = load_config(tm.CONFIGS / f"bible-es-en-{cell}.yaml")
    assert cfg.model.cell == cell
    assert replace(cfg.model, cell="lstm") == default.model
    assert cfg.train == default.train and cfg.data == default.data
    model = build_model(cfg.model, 100, 100, tm.PAD)
    assert count_parameters(model)["total"] > 0


def test_compiled_gate_math_is_refused_for_the_fused_cells():
    with pytest.raises(ConfigError, match="train.compile_cells"):
        config_from_dict({"model": {"cell": "lstm"}, "train": {"compile_cells": True}})
    cfg = config_from_dict({"model": {"cell": "lstm_ln"}, "train": {"compile_cells": True}})
    assert cfg.train.compile_cells


def test_compiled_gate_math_gives_the_eager_results():
    """`train.compile_cells`: the layer-normalised cell through torch.compile'd step functions
    gives the outputs and gradients of the eager ones (fp32)."""
    from nmt.model.cells import use_kernels

    torch.manual_seed(0)
    layer = RecurrentLayer("lstm_ln", 6, 5)
    x = torch.randn(3, 7, 6)
    h0, c0 = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    results = []
    try:
        for compiled in (False, True):
            use_kernels("compiled" if compiled else "eager")
            layer.zero_grad()
            out, (h, c) = layer(x, (h0, c0))
            (out.square().sum() + c.sum()).backward()
            results.append([out, h, c, *(p.grad.clone() for p in layer.parameters())])
    finally:
        use_kernels("eager")
    for eager, compiled_ in zip(*results, strict=True):
        torch.testing.assert_close(compiled_, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("train", "field"),
    [
        ({"cell_kernels": "compiled"}, "train.cell_kernels=compiled"),
        ({"cell_kernels": "fast"}, "train.cell_kernels"),
    ],
)
def test_cell_kernels_that_cannot_apply_are_refused(train: dict[str, Any], field: str):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({"model": {"cell": "lstm"}, "train": train})
    with pytest.raises(ConfigError, match="contradict"):
        config_from_dict(
            {
                "model": {"cell": "lstm_ln"},
                "train": {"cell_kernels": "native", "compile_cells": True},
            }
        )
    for cell in ("lstm_ln", "lstm", "gru", "lstm_cifg"):  # the loss's kernel serves them all
        cfg = config_from_dict({"model": {"cell": cell}, "train": {"cell_kernels": "native"}})
        assert cfg.train.cell_kernels == "native"


@pytest.fixture
def native_kernels() -> Any:
    """The C++ kernels (`nmt.native`) selected for the test, eager again after it."""
    from nmt.model.cells import use_kernels

    use_kernels("native")
    yield use_kernels
    use_kernels("eager")


@pytest.mark.parametrize(
    ("a_dtype", "hh_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_native_step_gives_the_plain_step_functions_results(
    native_kernels: Any, a_dtype: torch.dtype, hh_dtype: torch.dtype
):
    """The C++ step, forward and backward, against `_ln_fwd` / `_ln_bwd` on the same inputs:
    every output in its dtype, equal to float32 rounding (or the low-precision dtype's)."""
    from nmt import native
    from nmt.model import cells

    gen = torch.Generator().manual_seed(3)
    rows, width = 5, 24  # widths that are not a multiple of any vector length: 96 and 24

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    a, hh = rand(rows, 4 * width).to(a_dtype), (rand(rows, 4 * width, scale=3) + 1).to(hh_dtype)
    c_prev = rand(rows, width)
    weights = [rand(4 * width).abs() + 0.5, rand(width).abs() + 0.5, rand(width, scale=0.1)]
    plain = cells._ln_fwd(a, hh, c_prev, *weights, hh_dtype)
    out = native.ln_fwd(a, hh, c_prev, *weights, hh_dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if hh_dtype == torch.float32 else {}
    for mine, theirs in zip(out[:2], plain[:2], strict=True):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, **tol)
    dh, dc = rand(rows, width).to(hh_dtype), rand(rows, width)
    grads_plain = cells._ln_bwd(dh, dc, c_prev, plain[1], *plain[2:], *weights, a_dtype, hh_dtype)
    grads_native = native.ln_bwd(dh, dc, c_prev, out[1], *out[2:], *weights, a_dtype, hh_dtype)
    assert len(grads_native) == len(grads_plain) == 6
    for mine, theirs in zip(grads_native, grads_plain, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        torch.testing.assert_close(mine.float(), theirs.float(), **tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_native_kernel_gives_the_eager_model_training_step(native_kernels: Any, precision: str):
    """A whole lstm_ln model (bidirectional encoder layer, input-feeding decoder) under
    `train.cell_kernels: native`: logits (with and without gradients) and every parameter's
    gradient equal the eager run's (float32 rounding; bf16 autocast: the same bf16 products,
    so close to its rounding). The decoder's steps normalise their input in the kernel too."""
    model = tm.make_model("lstm_ln", "luong-general", "gnmt", input_feeding=True).train()
    batch = tm.toy_batch(torch.Generator().manual_seed(4), batch=7)
    results = []
    for kernels in ("eager", "native"):
        native_kernels(kernels)
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
        loss, _, _ = tm.label_smoothed_nll(logits.float(), batch["tgt_out"], tm.PAD, 0.1)
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            inference = model(
                batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"]
            )
        results.append(
            [logits.float(), inference.float(), *(p.grad.clone() for p in model.parameters())]
        )
    tol = {"atol": 1e-5, "rtol": 1e-4} if precision == "fp32" else {"atol": 2e-2, "rtol": 2e-2}
    for native, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(native, eager, **tol)


def test_tiny_model_on_the_native_kernel_learns_to_reverse_token_strings(native_kernels: Any):
    model = tm.make_model("lstm_ln", "luong-general", "gnmt", enc_hidden=16)
    losses = tm.train_toy(model, steps=150)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, (start, end)


def test_auto_kernels_use_the_native_kernel_or_fall_back_to_eager_with_a_warning(
    native_kernels: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from nmt import native
    from nmt.model import cells

    assert native_kernels("auto") == "native" and native.active(torch.zeros(1))

    def no_compiler() -> None:
        raise RuntimeError("train.cell_kernels: native needs a C++ compiler (test)")

    monkeypatch.setattr(native, "load", no_compiler)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        native_kernels("native")
    assert native_kernels("auto") == "eager"
    assert not native.active(torch.zeros(1))
    assert cells._step_math["lstm_ln"] == cells._EAGER["lstm_ln"]
    assert "plain tensor code" in caplog.text and "C++ compiler (test)" in caplog.text
