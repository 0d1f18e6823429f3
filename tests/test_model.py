"""Model behaviour for every cell x attention x encoder layout: shapes, padding invariance,
gradients, the step loop against teacher forcing, learning a toy task, parameter counts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nmt.config import ModelConfig, config_from_dict, encoder_output_dim, load_config
from nmt.loss import label_smoothed_nll
from nmt.model import DecoderState, EncoderMemory, Seq2Seq, build_model, count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAD, BOS, EOS = 0, 2, 3  # the model takes special ids as ints; these mirror the tokenizer's
VOCAB = 16

CELLS = ["lstm", "gru"]
ATTENTIONS = {
    "bahdanau": {"type": "bahdanau", "score": "additive"},
    "luong-dot": {"type": "luong", "score": "dot"},
    "luong-general": {"type": "luong", "score": "general"},
    "luong-concat": {"type": "luong", "score": "concat"},
    "gnmt": {"type": "gnmt", "score": "additive"},
}
LAYOUTS = ["gnmt", "bi"]
COMBOS = list(itertools.product(CELLS, ATTENTIONS, LAYOUTS))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; a second thread only adds synchronisation,
    which is very slow when the machine is busy. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(
    cell: str,
    attention: str,
    layout: str,
    *,
    input_feeding: bool = False,
    enc_hidden: int = 8,
    **model: Any,
) -> ModelConfig:
    """A tiny model: 3 encoder layers (the top one residual), 2 decoder layers (residual)."""
    values: dict[str, Any] = {
        "tokenizer": {"vocab_size": VOCAB},
        "model": {
            "cell": cell,
            "embed_dim": 12 if enc_hidden == 8 else enc_hidden,
            "embed_dropout": 0.0,
            "encoder": {
                "layout": layout,
                "num_layers": 3,
                "hidden_dim": enc_hidden,
                "residual_from": 2,
                "dropout": 0.0,
            },
            "decoder": {
                # the dot score needs the decoder width to equal the encoder output width
                "hidden_dim": enc_hidden * (2 if layout == "bi" else 1),
                "num_layers": 2,
                "residual_from": 1,
                "dropout": 0.0,
                "input_feeding": input_feeding,
            },
            "attention": ATTENTIONS[attention],
        },
    }
    for key, value in model.items():
        if isinstance(value, dict):
            values["model"][key].update(value)
        else:
            values["model"][key] = value
    return config_from_dict(values).model


def make_model(cell: str, attention: str, layout: str, **kwargs: Any) -> Seq2Seq:
    torch.manual_seed(0)
    return build_model(model_config(cell, attention, layout, **kwargs), VOCAB, VOCAB, PAD)


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pads sequences: (B, S) ids, (B,) lengths, (B, S) mask."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), PAD)
    for b, seq in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq)
    return ids, lengths, ids != PAD


def toy_batch(gen: torch.Generator, batch: int = 32, max_len: int = 6) -> dict[str, torch.Tensor]:
    """Random token strings; the target is the source reversed."""
    lengths = torch.randint(2, max_len + 1, (batch,), generator=gen).tolist()
    srcs = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    src, src_lengths, src_mask = pad_batch(srcs)
    tgt_in, _, _ = pad_batch([[BOS, *s[::-1]] for s in srcs])
    tgt_out, _, _ = pad_batch([[*s[::-1], EOS] for s in srcs])
    return {
        "src": src,
        "src_lengths": src_lengths,
        "src_mask": src_mask,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
    }


def combo_id(combo: tuple[str, str, str]) -> str:
    return "-".join(combo)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_shapes_and_attention_is_a_distribution_over_real_tokens(combo: tuple[str, str, str]):
    model = make_model(*combo).eval()
    batch = toy_batch(torch.Generator().manual_seed(1), batch=4)
    logits, attn = model.forward_with_attention(
        batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"]
    )
    b, s = batch["src"].shape
    t = batch["tgt_in"].size(1)
    assert logits.shape == (b, t, VOCAB)
    assert attn.shape == (b, t, s)
    assert torch.all(attn.masked_select(~batch["src_mask"].unsqueeze(1).expand_as(attn)) == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(b, t))

    memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
    layers, hidden = model.decoder.num_layers, model.decoder.hidden_dim
    assert state.hidden.shape == (layers, b, hidden)
    assert state.cell.shape == (layers, b, hidden if combo[0] == "lstm" else 0)
    step_logits, state, step_attn = model.step(batch["tgt_in"][:, 0], state, memory)
    assert step_logits.shape == (b, VOCAB)
    assert step_attn.shape == (b, s)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_padding_does_not_change_a_sentences_outputs(combo: tuple[str, str, str]):
    model = make_model(*combo).eval()
    srcs = [[5, 6, 7], [4, 9, 10, 11, 12, 13, 14], [8, 8, 9, 15, 4]]
    tgts = [[BOS, 7, 6, 5, 9], [BOS, 4], [BOS, 4, 15, 9, 8, 8, 5, 6]]
    src, src_lengths, src_mask = pad_batch(srcs)
    tgt_in, _, _ = pad_batch(tgts)
    with torch.no_grad():
        logits, attn = model.forward_with_attention(src, src_lengths, src_mask, tgt_in)
        memory, _ = model.encode(src, src_lengths, src_mask)
        for b, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
            one_src, one_len, one_mask = pad_batch([s])
            one_logits, one_attn = model.forward_with_attention(
                one_src, one_len, one_mask, torch.tensor([t])
            )
            one_memory, _ = model.encode(one_src, one_len, one_mask)
            torch.testing.assert_close(
                memory.enc_out[b, : len(s)], one_memory.enc_out[0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(logits[b, : len(t)], one_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                attn[b, : len(t), : len(s)], one_attn[0], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_gradients_reach_every_parameter(combo: tuple[str, str, str]):
    dropout = {"dropout": 0.1, "variational": combo[2] == "bi"}
    model = make_model(*combo, embed_dropout=0.1, encoder=dropout, decoder=dropout).train()
    batch = toy_batch(torch.Generator().manual_seed(2), batch=6)
    logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
    loss, _, _ = label_smoothed_nll(logits, batch["tgt_out"], PAD, 0.1)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


STEP_VARIANTS = [
    *COMBOS,
    ("lstm", "luong-general-feed", "gnmt"),
    ("gru", "luong-dot-feed", "bi"),
]


@pytest.mark.parametrize("combo", STEP_VARIANTS, ids=combo_id)
def test_step_loop_gives_the_teacher_forced_logits(combo: tuple[str, str, str]):
    cell, attention, layout = combo
    feed = attention.endswith("-feed")
    model = make_model(cell, attention.removesuffix("-feed"), layout, input_feeding=feed).eval()
    batch = toy_batch(torch.Generator().manual_seed(3), batch=5)
    with torch.no_grad():
        logits, attn = model.forward_with_attention(
            batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"]
        )
        memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
        step_logits, step_attn = [], []
        for t in range(batch["tgt_in"].size(1)):
            out, state, weights = model.step(batch["tgt_in"][:, t], state, memory)
            step_logits.append(out)
            step_attn.append(weights)
    torch.testing.assert_close(torch.stack(step_logits, 1), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(step_attn, 1), attn, atol=1e-5, rtol=1e-5)


FAST_VARIANTS = [
    ("lstm", "luong-general-feed", "gnmt"),
    ("lstm", "luong-dot", "bi"),
    ("lstm", "bahdanau", "gnmt"),
    ("lstm", "gnmt", "bi"),
]


@pytest.mark.parametrize("combo", FAST_VARIANTS, ids=combo_id)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_decoding_step_matches_the_plain_step(combo: tuple[str, str, str], precision: str):
    cell, attention, layout = combo
    feed = attention.endswith("-feed")
    model = make_model(cell, attention.removesuffix("-feed"), layout, input_feeding=feed).eval()
    batch = toy_batch(torch.Generator().manual_seed(6), batch=6)
    tol = {"atol": 1e-5, "rtol": 1e-5} if precision == "fp32" else {"atol": 0.05, "rtol": 0.05}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
        plain_state = state
        weights = model.decoder.step_weights(model.target_embedding.weight)
        assert weights is not None  # an LSTM decoder in eval mode without gradients
        for t in range(batch["tgt_in"].size(1)):
            tokens = batch["tgt_in"][:, t]
            emb = model.target_embedding(tokens)
            fast = (weights, weights.table.index_select(0, tokens))
            out, state, attn = model.decoder.step(emb, state, memory, fast)
            plain_out, plain_state, plain_attn = model.decoder.step(emb, plain_state, memory)
            torch.testing.assert_close(out.float(), plain_out.float(), **tol)
            torch.testing.assert_close(attn, plain_attn, **tol)
            torch.testing.assert_close(state.hidden.float(), plain_state.hidden.float(), **tol)
            torch.testing.assert_close(state.cell.float(), plain_state.cell.float(), **tol)


def test_fast_step_only_where_it_applies_and_follows_the_weights():
    model = make_model("lstm", "luong-general", "gnmt", input_feeding=True)
    embedding = model.target_embedding.weight
    assert model.decoder.step_weights(embedding) is None  # training mode
    model.eval()
    assert model.decoder.step_weights(embedding) is None  # gradients on
    with torch.no_grad():
        first = model.decoder.step_weights(embedding)
        assert first is not None and model.decoder.step_weights(embedding) is first  # kept
        model.decoder.layers[0].bias_ih_l0.add_(0.5)  # in place, as an optimiser step would
        second = model.decoder.step_weights(embedding)
        assert second is not None and second is not first
        torch.testing.assert_close(second.table, first.table + 0.5)
        gru = make_model("gru", "luong-general", "gnmt").eval()
        assert gru.decoder.step_weights(gru.target_embedding.weight) is None
        residual = make_model(
            "lstm", "gnmt", "gnmt", enc_hidden=16, decoder={"residual_from": 0}
        ).eval()
        assert residual.decoder.step_weights(residual.target_embedding.weight) is None


def train_toy(model: Seq2Seq, steps: int, lr: float = 0.02, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        batch = toy_batch(gen)
        logits = model(batch["src"], batch["src_lengths"], batch["src_mask"], batch["tgt_in"])
        loss_sum, _, n_tokens = label_smoothed_nll(logits, batch["tgt_out"], PAD)
        loss = loss_sum / n_tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_loss_falls_on_reversing_token_strings(combo: tuple[str, str, str]):
    losses = train_toy(make_model(*combo, enc_hidden=16), steps=120)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert start > 2.5  # about log(16) at initialisation
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize(
    "combo",
    [("lstm", "luong-general", "gnmt"), ("lstm", "bahdanau", "bi"), ("gru", "gnmt", "bi")],
    ids=combo_id,
)
def test_tiny_model_learns_to_reverse_token_strings(combo: tuple[str, str, str]):
    model = make_model(*combo, enc_hidden=16)
    losses = train_toy(model, steps=300)
    assert sum(losses[-10:]) / 10 < 0.05, losses[-10:]
    # and greedy step-wise decoding reproduces the reversed string
    model.eval()
    batch = toy_batch(torch.Generator().manual_seed(99), batch=16)
    with torch.no_grad():
        memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
        tokens = torch.full((16,), BOS)
        outputs = []
        for _ in range(batch["tgt_out"].size(1)):
            logits, state, _ = model.step(tokens, state, memory)
            tokens = logits.argmax(-1)
            outputs.append(tokens)
    predicted = torch.stack(outputs, 1)
    real = batch["tgt_out"] != PAD
    accuracy = (predicted == batch["tgt_out"])[real].float().mean().item()
    assert accuracy > 0.95


def lstm_params(input_dim: int, hidden: int) -> int:
    """Closed form: 4(h^2 + h*i + h) plus PyTorch's second bias vector of 4h."""
    return 4 * (hidden * hidden + hidden * input_dim + hidden) + 4 * hidden


def gru_params(input_dim: int, hidden: int) -> int:
    return 3 * (hidden * hidden + hidden * input_dim + hidden) + 3 * hidden


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_match_the_closed_form(cell: str, tie: bool):
    rnn = lstm_params if cell == "lstm" else gru_params
    cfg = model_config(cell, "luong-general", "gnmt", tie_output=tie, share_embeddings=False)
    model = build_model(cfg, 20, 30, PAD)
    counts = count_parameters(model)
    e, h_enc, h_dec = cfg.embed_dim, cfg.encoder.hidden_dim, cfg.decoder.hidden_dim
    enc_dim = encoder_output_dim(cfg)
    assert counts["embeddings"] == 20 * e + 30 * e
    # GNMT layout: bidirectional bottom layer, then unidirectional layers
    assert counts["encoder"] == 2 * rnn(e, h_enc) + rnn(2 * h_enc, h_enc) + rnn(h_enc, h_enc)
    assert counts["decoder"] == rnn(e, h_dec) + rnn(h_dec, h_dec)
    assert counts["attention"] == enc_dim * h_dec + (enc_dim + h_dec) * h_dec  # W_a, W_c
    states = 2 if cell == "lstm" else 1
    assert counts["bridge"] == enc_dim * states * 2 * h_dec + states * 2 * h_dec
    output = (h_dec * e if h_dec != e else 0) if tie else 30 * h_dec
    assert counts["output"] == output + 30
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_shared_and_tied_embeddings_are_counted_once():
    cfg = model_config("lstm", "luong-general", "bi", share_embeddings=True, tie_output=True)
    model = build_model(cfg, VOCAB, VOCAB, PAD)
    counts = count_parameters(model)
    assert counts["embeddings"] == VOCAB * cfg.embed_dim
    assert model.target_embedding is model.src_embed
    assert counts["output"] == cfg.decoder.hidden_dim * cfg.embed_dim + VOCAB  # map to E + bias
    assert len(model.state_dict()) == len(list(model.parameters()))  # no duplicate tensors


def test_shared_embeddings_need_one_vocabulary():
    cfg = model_config("lstm", "luong-general", "gnmt", share_embeddings=True)
    with pytest.raises(ValueError, match="joint vocabulary"):
        build_model(cfg, 20, 30, PAD)


def test_lstm_forget_gate_bias_starts_at_one():
    model = make_model("lstm", "luong-general", "gnmt")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LSTM):
            h = module.hidden_size
            params = dict(module.named_parameters())
            total = params["bias_ih_l0"] + params["bias_hh_l0"]
            assert torch.all(total[h : 2 * h] == 1.0), name


def test_variational_dropout_shares_one_mask_across_time():
    model = make_model(
        "lstm", "luong-general", "gnmt", decoder={"dropout": 0.5, "variational": True}
    )
    dropout = model.decoder.dropout.train()
    x = torch.ones(3, 7, 5)
    dropped = dropout(x)
    assert torch.all(dropped == dropped[:, :1])  # same mask at every time step
    assert (dropped == 0).any() and (dropped == 2.0).any()


def test_state_and_memory_reorder_rows():
    model = make_model("lstm", "luong-general", "gnmt", input_feeding=True).eval()
    batch = toy_batch(torch.Generator().manual_seed(4), batch=3)
    memory, state = model.encode(batch["src"], batch["src_lengths"], batch["src_mask"])
    _, state, _ = model.step(batch["tgt_in"][:, 0], state, memory)
    idx = torch.tensor([2, 2, 0, 1])
    reordered = state.index_select(idx)
    assert isinstance(reordered, DecoderState)
    torch.testing.assert_close(reordered.hidden, state.hidden[:, idx])
    torch.testing.assert_close(reordered.cell, state.cell[:, idx])
    torch.testing.assert_close(reordered.attn_vector, state.attn_vector[idx])
    memory4 = memory.index_select(idx)
    assert isinstance(memory4, EncoderMemory)
    logits4, _, _ = model.step(batch["tgt_in"][idx, 1], reordered, memory4)
    logits, _, _ = model.step(batch["tgt_in"][:, 1], state, memory)
    torch.testing.assert_close(logits4, logits[idx])


@pytest.mark.parametrize("attention", ["luong-general", "gnmt", "bahdanau"])
def test_runs_under_bf16_autocast_and_as_a_bf16_model(attention: str):
    model = make_model("lstm", attention, "gnmt")
    batch = toy_batch(torch.Generator().manual_seed(5), batch=4)
    args = (batch["src"], batch["src_lengths"], batch["src_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(*args, batch["tgt_in"])
        loss, _, _ = label_smoothed_nll(logits, batch["tgt_out"], PAD, 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    fp32 = model.eval()(*args, batch["tgt_in"])
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        memory, state = model.encode(*args)
        step_logits = []
        for t in range(batch["tgt_in"].size(1)):
            out, state, _ = model.step(batch["tgt_in"][:, t], state, memory)
            step_logits.append(out)
    torch.testing.assert_close(torch.stack(step_logits, 1).float(), fp32, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", ["bible-es-en", "luong", "bahdanau", "gnmt-8layer"])
def test_shipped_model_configs_load_and_build(name: str):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if name == "gnmt-8layer":
        return  # built in the test below
    vocab = cfg.tokenizer.vocab_size
    model = build_model(cfg.model, vocab, vocab, PAD)
    assert count_parameters(model)["total"] > 1_000_000


def test_gnmt_8layer_runs_forward_and_backward():
    torch.set_num_threads(max(2, torch.get_num_threads()))  # a big model: use the cores
    cfg = load_config(CONFIGS / "gnmt-8layer.yaml").model
    assert (cfg.encoder.num_layers, cfg.decoder.num_layers) == (8, 8)
    assert cfg.encoder.hidden_dim == cfg.decoder.hidden_dim == 1024
    torch.manual_seed(0)
    model = build_model(cfg, 32000, 32000, PAD)
    counts = count_parameters(model)
    assert counts["total"] > 200_000_000
    src, src_lengths, src_mask = pad_batch([[5, 6, 7, 8, 9], [10, 11, 12]])
    tgt_in, _, _ = pad_batch([[BOS, 9, 8, 7, 6], [BOS, 12, 11]])
    tgt_out, _, _ = pad_batch([[9, 8, 7, 6, EOS], [12, 11, EOS]])
    logits = model(src, src_lengths, src_mask, tgt_in)
    assert logits.shape == (2, 5, 32000)
    loss, _, _ = label_smoothed_nll(logits, tgt_out, PAD, 0.1)
    loss.backward()
    top = dict(model.encoder.layers[-1].named_parameters())["weight_hh_l0"]
    assert top.grad is not None and top.grad.abs().sum() > 0
