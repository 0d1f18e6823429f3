"""Recurrent encoder: per-layer recurrent stacks (GNMT, all-bidirectional or all-unidirectional),
residuals, dropout; the unidirectional stack also advances token by token with its state carried.

Also the recurrent building blocks the decoder shares: `make_rnn`, `LayerDropout`.

Padding. A padded batch is run through oneDNN's fused whole-sequence kernels instead of
`PackedSequence`: packed input makes PyTorch fall back to a per-step implementation on CPU
(1.5x slower under bf16, 2.5x under fp32 for a 2-layer encoder), and with right-padded input
only the backward direction can see padding. So the backward direction reads every sentence
reversed within its own length (`reverse_index`), which puts its padding at the end where it
cannot reach a real token, and its output is put back in order with the same index. The
result is exactly what packing computes: padding never changes a real token's output.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from nmt import native
from nmt.model.cells import CELLS, CUSTOM_CELLS, RecurrentLayer, lstm_on_kernels
from nmt.model.dropout import dropout, keep_mask

RNN_CELLS: dict[str, type[nn.LSTM] | type[nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}


def make_rnn(
    cell: str,
    input_dim: int,
    hidden_dim: int,
    dropout_recurrent: float = 0.0,
    weight_drop: float = 0.0,
) -> nn.LSTM | nn.GRU | RecurrentLayer:
    """One unidirectional, batch-first recurrent layer; every LSTM's forget-gate bias starts
    at 1. `lstm` and `gru` are the fused nn.LSTM / nn.GRU, which take no recurrent
    regularisation; the other cells are `RecurrentLayer`s."""
    if cell in CUSTOM_CELLS:
        return RecurrentLayer(cell, input_dim, hidden_dim, dropout_recurrent, weight_drop)
    if cell not in RNN_CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
    if dropout_recurrent or weight_drop:
        raise ValueError(
            f"cell {cell!r} runs on the fused nn.{cell.upper()}, which cannot apply "
            f"dropout_recurrent or weight_drop; choose one of {', '.join(CUSTOM_CELLS)}"
        )
    rnn = RNN_CELLS[cell](input_dim, hidden_dim, batch_first=True)
    if isinstance(rnn, nn.LSTM):
        with torch.no_grad():
            # gates are ordered (input, forget, cell, output); PyTorch adds b_ih and b_hh
            for name, param in rnn.named_parameters():
                if name.startswith("bias_"):
                    param[hidden_dim : 2 * hidden_dim] = 1.0 if name.startswith("bias_ih") else 0.0
    return rnn


class LayerDropout(nn.Module):
    """Dropout on a layer's input (B, T, D); `variational` shares one mask across time."""

    def __init__(self, p: float, variational: bool) -> None:
        super().__init__()
        self.p = p
        self.variational = variational

    def active(self) -> bool:
        return self.training and self.p > 0

    def mask(self, batch: int, dim: int, like: Tensor, steps: int = 0) -> Tensor | None:
        """A scaled keep-mask when dropout is active: (B, 1, D) shared across time when
        variational; otherwise (B, steps, D), a fresh draw per position drawn at once for a
        step loop, or None when steps is 0 (`forward` draws its own). None when inactive."""
        if not self.active() or not (self.variational or steps):
            return None
        shape = (batch, 1 if self.variational else steps, dim)
        return keep_mask(shape, self.p, like.dtype, like.device)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D); a mask from `mask()` is reused so step-wise calls share it."""
        if not self.active():
            return x
        if mask is not None:
            return x * mask
        if not self.variational:
            return dropout(x, self.p)
        return x * keep_mask((x.size(0), 1, x.size(-1)), self.p, x.dtype, x.device)


def reverse_index(lengths: Tensor, max_len: int) -> Tensor:
    """(B, S) index that reverses each row within its length and leaves padding in place.

    It is its own inverse. lengths: (B,) long on the device of the data.
    """
    positions = torch.arange(max_len, device=lengths.device)
    reversed_positions = lengths.unsqueeze(1) - 1 - positions  # (B, S)
    return torch.where(reversed_positions >= 0, reversed_positions, positions)


def _run(rnn: nn.Module, x: Tensor) -> Tensor:
    """One layer over a whole batch from zeros. Training a plain nn.LSTM on the CPU with the
    C++ kernels on (`cells.use_kernels("native")`) runs it on our layer's loop
    (`lstm_on_kernels`), faster than oneDNN's backward; otherwise the module itself runs."""
    if type(rnn) is nn.LSTM and torch.is_grad_enabled() and native.active(x):
        lstm = cast(nn.LSTM, rnn)
        if lstm.num_layers == 1 and not lstm.bidirectional and lstm.bias and lstm.proj_size == 0:
            return lstm_on_kernels(lstm, x)
    out, _ = rnn(x)
    return out


# one layer's recurrent state: (h, c), each (1, B, H), for LSTM cells; h alone for GRU
LayerState = tuple[Tensor, Tensor] | Tensor


def _advance_layer(
    layer: nn.Module, x: Tensor, state: LayerState | None, lengths: Tensor | None = None
) -> tuple[Tensor, LayerState]:
    """One layer over x (B, S', D) from `state` (None: zeros); with `lengths` (B,), row b's
    tokens are its first lengths[b] and the state returned is the one after them (the rest
    is padding, its outputs undefined).

    The fused nn.LSTM / nn.GRU run step by step here: a live source arrives a few tokens at a
    time, and oneDNN builds a sequence kernel for every new length (about 40 ms each on CPU).
    The input's product for all the tokens is one matrix product, so that only h W_hh^T is
    per token: the few rows of a live batch make each product a pass over the weights, which
    is its whole cost. Our own cells run their layer (equal lengths only)."""
    if type(layer) not in (nn.LSTM, nn.GRU):  # our own cells; a quantised layer
        if lengths is not None and bool((lengths != x.size(1)).any()):
            raise ValueError("ragged lengths need a fused nn.LSTM or nn.GRU layer")
        return layer(x) if state is None else layer(x, state)
    rnn = cast(nn.RNNBase, layer)
    w_ih, w_hh, b_ih, b_hh = rnn.all_weights[0]
    lstm = isinstance(rnn, nn.LSTM)
    width = rnn.hidden_size
    pre = nn.functional.linear(x, w_ih, b_ih)  # (B, S', G*H), every token in one product
    gates_in = pre.float()  # the gate math runs in fp32
    if state is None:
        h = pre.new_zeros(x.size(0), width)
    else:
        h = state[0][0] if lstm else cast(Tensor, state)[0]
    c = state[1][0].float() if lstm and state is not None else h.float()  # GRU: unused
    outs = []
    for t in range(x.size(1)):
        rec = nn.functional.linear(h, w_hh, b_hh).float()
        gates = gates_in[:, t]
        if lstm:  # gate order i, f, g, o (nn.LSTM's)
            i, f, g, o = (gates + rec).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = (torch.sigmoid(o) * torch.tanh(c_new)).to(h.dtype)
        else:  # r, z, n: n = tanh(x W_in + b_in + r * (h W_hn + b_hn)) (nn.GRU's)
            reset, update = torch.sigmoid(gates[:, : 2 * width] + rec[:, : 2 * width]).chunk(2, 1)
            new = torch.tanh(gates[:, 2 * width :] + reset * rec[:, 2 * width :])
            h_new = torch.lerp(new, h.float(), update).to(h.dtype)
            c_new = c
        if lengths is not None:  # rows past their length keep their state
            live = (t < lengths).unsqueeze(1)
            h_new = torch.where(live, h_new, h)
            c_new = torch.where(live, c_new, c) if lstm else c
        h, c = h_new, c_new
        outs.append(h)
    out = torch.stack(outs, dim=1)
    return out, ((h.unsqueeze(0), c.unsqueeze(0)) if lstm else h.unsqueeze(0))


class EncoderState(NamedTuple):
    """A unidirectional encoder's state after the source read so far (`Encoder.advance`)."""

    layers: list[LayerState]  # per layer, its state after the last token read
    length: int  # tokens read so far


class BiRNN(nn.Module):
    """A bidirectional layer as two unidirectional kernels; the backward one reads each
    sentence reversed within its length, so padding never reaches a real token."""

    def __init__(
        self,
        cell: str,
        input_dim: int,
        hidden_dim: int,
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fwd = make_rnn(cell, input_dim, hidden_dim, dropout_recurrent, weight_drop)
        self.bwd = make_rnn(cell, input_dim, hidden_dim, dropout_recurrent, weight_drop)

    def forward(self, x: Tensor, rev_index: Tensor | None) -> Tensor:
        """x: (B, S, D); rev_index: (B, S, 1) from `reverse_index`, or None for flip (no padding).
        Returns (B, S, 2H), forward and backward directions concatenated."""
        out_fwd = _run(self.fwd, x)
        if rev_index is None:
            out_bwd = _run(self.bwd, x.flip(1)).flip(1)
        else:
            x_rev = x.gather(1, rev_index.expand(-1, -1, x.size(-1)))
            out_rev = _run(self.bwd, x_rev)
            out_bwd = out_rev.gather(1, rev_index.expand(-1, -1, out_rev.size(-1)))
        return torch.cat([out_fwd, out_bwd.to(out_fwd.dtype)], dim=-1)


class Encoder(nn.Module):
    """A stack of recurrent layers over embedded source tokens.

    Layouts: `gnmt` (Wu et al., 2016): only the bottom layer is bidirectional, the layers above
    are unidirectional; `bi`: every layer is bidirectional; `uni`: every layer is
    unidirectional, so a token's encoding depends on the tokens up to it only and the source can
    be encoded as it arrives (`advance`; simultaneous translation). Layers at index `residual_from` and
    above add their input to their output; dropout is applied to the input of every layer above
    the bottom (the embedding dropout is the caller's). Custom cells may also drop out h_{t-1}
    (`dropout_recurrent`, one mask per sequence) and W_hh (`weight_drop`, once per batch).
    """

    def __init__(
        self,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        layout: str = "gnmt",
        residual_from: int = 2,
        dropout: float = 0.0,
        variational: bool = False,
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if layout not in ("gnmt", "bi", "uni"):
            raise ValueError(f"unknown encoder layout {layout!r}; choose gnmt, bi or uni")
        self.residual_from = residual_from
        self.layers = nn.ModuleList()
        width = embed_dim
        regularise = (dropout_recurrent, weight_drop)
        for i in range(num_layers):
            if layout == "bi" or (layout == "gnmt" and i == 0):
                self.layers.append(BiRNN(cell, width, hidden_dim, *regularise))
                out_width = 2 * hidden_dim
            else:
                self.layers.append(make_rnn(cell, width, hidden_dim, *regularise))
                out_width = hidden_dim
            if i >= residual_from and out_width != width:
                raise ValueError(
                    f"encoder layer {i} maps width {width} to {out_width}; it cannot be residual"
                )
            width = out_width
        self.output_dim = width
        self.top_bidirectional = isinstance(self.layers[-1], BiRNN)
        self.streaming = layout == "uni"  # whether `advance` applies
        self.dropout = LayerDropout(dropout, variational)

    def forward(self, emb: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encodes a right-padded batch.

        Args:
            emb: (B, S, E) embedded source tokens.
            src_lengths: (B,) long, real lengths (>= 1).
        Returns:
            enc_out (B, S, He) (values on padding are unspecified) and final (B, He): the top
            layer's state after the last real token (forward direction) and after the first
            token (backward direction, when the top layer is bidirectional).
        """
        batch, max_len, _ = emb.shape
        lengths = src_lengths.to(emb.device)
        rev_index = None
        if bool((lengths != max_len).any()):
            rev_index = reverse_index(lengths, max_len).unsqueeze(-1)  # (B, S, 1)
        x = emb
        for i, layer in enumerate(self.layers):
            inp = x if i == 0 else self.dropout(x)
            out = layer(inp, rev_index) if isinstance(layer, BiRNN) else _run(layer, inp)
            x = out + x if i >= self.residual_from else out
        last = (lengths - 1).view(batch, 1, 1).expand(-1, 1, x.size(-1))
        final = x.gather(1, last).squeeze(1)  # (B, He)
        if self.top_bidirectional:
            half = x.size(-1) // 2
            final = torch.cat([final[:, :half], x[:, 0, half:]], dim=-1)
        # nn.LSTM's batch-first output is a transposed view; attention's bmm would copy it on
        # every decoding step, so copy once here
        return x.contiguous(), final

    @property
    def ragged_advance(self) -> bool:
        """Whether `advance` takes rows of different lengths (fused nn.LSTM / nn.GRU layers)."""
        return all(type(layer) in (nn.LSTM, nn.GRU) for layer in self.layers)

    def advance(
        self, emb: Tensor, state: EncoderState | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, EncoderState]:
        """Encodes more source tokens after those `state` has read (layout `uni` only).

        Encoding a sentence in pieces gives the same outputs as encoding it whole with
        `forward`, since no layer looks ahead.

        Args:
            emb: (B, S', E) the next S' >= 1 embedded tokens; no padding, unless `lengths`.
            state: what `advance` returned for the tokens before, or None at the start.
            lengths: (B,) row b's new tokens are its first lengths[b] >= 1, the rest padding
                (`ragged_advance` encoders only); None: all S'.
        Returns:
            enc_out (B, S', He) of the new tokens (undefined past a row's length) and the
            state after them (after each row's own length).
        """
        if not self.streaming:
            raise ValueError("only an encoder with layout 'uni' can be advanced token by token")
        x = emb
        states: list[LayerState] = []
        for i, layer in enumerate(self.layers):
            inp = x if i == 0 else self.dropout(x)
            before = None if state is None else state.layers[i]
            out, after = _advance_layer(layer, inp, before, lengths)
            states.append(after)
            x = out + x if i >= self.residual_from else out
        length = emb.size(1) + (0 if state is None else state.length)
        return x.contiguous(), EncoderState(states, length)
