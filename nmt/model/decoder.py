"""Attentional recurrent decoders: DecoderState, the step, and fast whole-sequence teacher forcing.

Three arrangements share one stack of per-layer LSTM/GRU kernels and one `_block` signature
(embedded tokens (B, T, E) and a state in; output vectors, the new state and attention out):

- Luong et al. (2015): the top layer's current output attends; h~ = tanh(W_c [c; h]) (eq. 5).
  Without input feeding nothing depends on the previous step's attention, so teacher forcing
  runs each layer once over the whole target sequence and attention as one batched matmul.
  With input feeding (sec. 3.3) h~_{t-1} joins the next input and teacher forcing loops.
- Bahdanau et al. (2015): the previous top state s_{i-1} attends and the context joins the
  bottom layer's input, so teacher forcing loops over steps.
- GNMT (Wu et al., 2016, as in the "gnmt_v2" arrangement of the TensorFlow NMT tutorial): the
  bottom layer's current output attends and the context is concatenated to the input of every
  layer above it. Teacher forcing is whole-sequence: bottom layer, attention for all steps,
  then every upper layer.

The step is `_block` with T = 1, so the fast path and the step cannot drift apart. Work that is
the same for every step (key projections) is in `EncoderMemory.keys`; the output projection is
the caller's and runs once over all positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.model import input_feeding
from nmt.model.attention import Attention, EncoderMemory
from nmt.model.cells import RecurrentLayer, RecurrentNoise, SequenceNoise
from nmt.model.encoder import LayerDropout, make_rnn

# per decoder layer, the recurrent masks of a custom cell, drawn once per batch
LayerNoise = list[RecurrentNoise | None] | None


def _layer_noise(memory: EncoderMemory) -> LayerNoise:
    return None if memory.noise is None else memory.noise.recurrent


class DecoderState(NamedTuple):
    """The decoder's recurrent state, passed in and out of every step."""

    hidden: Tensor  # (L, B, H)
    cell: Tensor  # (L, B, H) for LSTM (fp32 for the custom cells); (L, B, 0) for GRU
    attn_vector: Tensor  # (B, H) previous attentional vector with input feeding, else (B, 0)

    def index_select(self, idx: Tensor) -> DecoderState:
        """Rows `idx` of the batch (beam reordering). idx: (B',) long."""
        return DecoderState(
            self.hidden.index_select(1, idx),
            self.cell.index_select(1, idx),
            self.attn_vector.index_select(0, idx),
        )


class StepWeights(NamedTuple):
    """The weights of the decoding fast path (`Decoder.fast_step`), in the compute dtype.

    For every LSTM layer, [W_ih | W_hh] side by side, so that a step is one matmul per layer
    over [input; h]. The bottom layer's input starts with the token embedding: its share of the
    input projection, plus both biases, is precomputed for every token (`table`), so the
    bottom layer multiplies only the rest of its input (attention vector or context) and h.
    """

    table: Tensor  # (V, 4H) W_ih[:, :E] e_v + b_ih + b_hh of the bottom layer, per token
    weights: list[Tensor]  # per layer (4H, In' + H), In' = the input without the embedding
    biases: list[Tensor | None]  # per layer (4H,) b_ih + b_hh; None for the bottom (in table)


# a decoding step's fast path: its weights and the previous tokens' rows of the table (B, 4H)
FastStep = tuple[StepWeights, Tensor]


class Bridge(nn.Module):
    """Initial decoder state: `dense` is tanh(W f + b) per layer (and per LSTM state) from the
    encoder's final state f; `zero` starts from zeros."""

    def __init__(
        self, kind: str, enc_dim: int, num_layers: int, hidden_dim: int, num_states: int
    ) -> None:
        super().__init__()
        if kind not in ("dense", "zero"):
            raise ValueError(f"unknown bridge {kind!r}; choose dense or zero")
        self.num_layers, self.hidden_dim, self.num_states = num_layers, hidden_dim, num_states
        self.proj = (
            nn.Linear(enc_dim, num_states * num_layers * hidden_dim) if kind == "dense" else None
        )

    def forward(self, final: Tensor) -> tuple[Tensor, Tensor]:
        """final: (B, He) -> hidden (L, B, H), cell (L, B, H) (LSTM) or (L, B, 0) (GRU)."""
        batch = final.size(0)
        shape = (self.num_layers, batch, self.hidden_dim)
        if self.proj is None:
            hidden = final.new_zeros(shape)
            cell = final.new_zeros(shape if self.num_states == 2 else (*shape[:2], 0))
            return hidden, cell
        states = torch.tanh(self.proj(final))  # (B, n * L * H)
        states = states.view(batch, self.num_states, self.num_layers, self.hidden_dim)
        states = states.permute(1, 2, 0, 3)  # (n, L, B, H)
        hidden = states[0].contiguous()
        cell = states[1].contiguous() if self.num_states == 2 else hidden.new_zeros(*shape[:2], 0)
        return hidden, cell


class Decoder(nn.Module):
    """Stacked per-layer recurrent layers with attention; subclasses arrange where attention sits.

    Dropout is applied to the input of every layer above the bottom and to the output vectors;
    custom cells may also drop out h_{t-1} and W_hh (see `nmt.model.cells`). The masks that
    are shared across time are drawn once per batch (`sample_noise`) and travel in
    `EncoderMemory.noise`, so a loop of `step` calls uses one mask per sequence, as teacher
    forcing does. Layers at index `residual_from` and above add their input to their output.
    """

    loops_over_steps = False  # whether teacher forcing has to run `_block` one step at a time
    feeds_attn_vector = False  # whether DecoderState.attn_vector is used (input feeding)
    # teacher forcing by the plain loop over `_block` even where a faster loop exists (the
    # oracle the faster one is tested and benchmarked against)
    reference_loop = False

    def __init__(
        self,
        cell: str,
        layer_inputs: list[int],
        hidden_dim: int,
        enc_dim: int,
        attention: Attention,
        residual_from: int,
        dropout: float,
        variational: bool,
        bridge: str,
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.is_lstm = cell != "gru"  # whether the state has a cell (every LSTM variant)
        self.num_layers = len(layer_inputs)
        self.hidden_dim = hidden_dim
        self.output_dim = hidden_dim
        self.residual_from = residual_from
        self.layers = nn.ModuleList(
            [
                make_rnn(cell, width, hidden_dim, dropout_recurrent, weight_drop)
                for width in layer_inputs
            ]
        )
        self.attention = attention
        self.bridge = Bridge(bridge, enc_dim, self.num_layers, hidden_dim, 2 if self.is_lstm else 1)
        self.dropout = LayerDropout(dropout, variational)
        self._step_cache: tuple[tuple[object, ...], StepWeights] | None = None

    # -- state ------------------------------------------------------------------------------

    def init_state(self, final: Tensor) -> DecoderState:
        """The state before the first target token. final: (B, He) from the encoder."""
        hidden, cell = self.bridge(final)
        batch = final.size(0)
        feed_dim = self.output_dim if self.feeds_attn_vector else 0
        attn_vector = hidden.new_zeros(batch, feed_dim)
        return DecoderState(hidden, cell, attn_vector)

    def sample_noise(self, batch: int, like: Tensor) -> SequenceNoise | None:
        """The masks a batch keeps for all its steps: variational input and output dropout
        (B, 1, H) and the custom cells' recurrent masks. None in eval mode or when there are
        none. like: a tensor on the target device in the compute dtype."""
        inputs = self._masks(batch, like) if self.dropout.variational else []
        recurrent = [
            layer.sample_noise(batch, like) if isinstance(layer, RecurrentLayer) else None
            for layer in self.layers
        ]
        if all(m is None for m in inputs) and all(n is None for n in recurrent):
            return None
        return SequenceNoise(inputs or [None] * self.num_layers, recurrent)

    def _sequence_masks(self, memory: EncoderMemory, batch: int, like: Tensor, steps: int = 0
                        ) -> list[Tensor | None]:  # fmt: skip
        """The dropout masks of a teacher-forced batch or a step: the batch's variational
        ones from `memory` where drawn, else as `_masks` draws them."""
        if memory.noise is not None and self.dropout.variational:
            return [None if m is None else m.to(like.dtype) for m in memory.noise.inputs]
        return self._masks(batch, like, steps)

    def _cell_kernel(self, inp: Tensor) -> bool:
        """Whether a single step runs faster as a cell than as a length-1 sequence.

        Measured on CPU: under bf16 autocast `lstm_cell` is about 1.7x faster than a
        length-1 nn.LSTM call (forward + backward), while in fp32 nn.LSTM's oneDNN kernel is
        1.4x faster; `gru_cell` measured no slower than nn.GRU in either."""
        if not self.is_lstm or inp.device.type != "cpu" or inp.dtype != torch.float32:
            return True
        return torch.is_autocast_enabled("cpu")

    # -- the decoding fast path ---------------------------------------------------------------

    def step_weights(self, embedding: Tensor) -> StepWeights | None:
        """The fast path's weights for target embedding matrix (V, E), built once and kept
        until any weight changes; None where the plain step must run: training, gradients,
        GRU cells, quantised layers, a residual bottom layer, or another device than the CPU
        (a GPU has fused LSTM cells of its own)."""
        if (
            self.training
            or torch.is_grad_enabled()
            or not self.is_lstm
            or self.residual_from == 0
            or embedding.device.type != "cpu"
            or not all(type(layer) is nn.LSTM and layer.bias for layer in self.layers)
        ):
            return None
        params = [embedding, *self.layers.parameters()]
        device = embedding.device.type
        dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else embedding.dtype
        )
        key = (tuple((p.data_ptr(), p._version) for p in params), dtype)
        if self._step_cache is not None and self._step_cache[0] == key:
            return self._step_cache[1]
        dim = embedding.size(1)
        weights: list[Tensor] = []
        biases: list[Tensor | None] = []
        table = embedding
        for i, layer in enumerate(self.layers):
            w_ih, w_hh, b_ih, b_hh = cast(nn.LSTM, layer).all_weights[0]
            bias = (b_ih + b_hh).float()
            if i == 0:  # the embedding's columns of W_ih go into the table
                table = F.linear(embedding.float(), w_ih[:, :dim].float(), bias).to(dtype)
            w_in = w_ih[:, dim:] if i == 0 else w_ih
            weights.append(torch.cat([w_in, w_hh], dim=1).to(dtype))
            biases.append(None if i == 0 else bias.to(dtype))
        step_weights = StepWeights(table, weights, biases)
        self._step_cache = (key, step_weights)
        return step_weights

    def _fused_layer(
        self, i: int, rest: Tensor | None, state: DecoderState, weight: Tensor, base: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i's LSTM step as a single matmul: gates = base + [rest; h] W^T (gate order
        i, f, g, o as in nn.LSTM). rest: (B, 1, In') or None; base: (4H,) or (B, 4H).
        Returns out (B, 1, H), h and c (1, B, H)."""
        h = state.hidden[i].to(weight.dtype)
        inp = h if rest is None else torch.cat([rest[:, 0].to(weight.dtype), h], dim=1)
        gates = torch.addmm(base, inp, weight.t())
        in_gate, forget, cell_in, out_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget) * state.cell[i].to(gates.dtype)
        c = c + torch.sigmoid(in_gate) * torch.tanh(cell_in)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h.unsqueeze(1), h.unsqueeze(0), c.unsqueeze(0)

    def _stack(
        self,
        emb: Tensor,
        rest: Tensor | None,
        state: DecoderState,
        masks: list[Tensor | None],
        fast: FastStep | None,
        noise: LayerNoise = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All layers, the bottom one over [emb; rest], each one above over the (dropped-out)
        output below it, residual from `residual_from`. Returns the top output (B, T, H) and
        the new hidden and cell (L, B, H)."""
        x = emb
        hs, cs = [], []
        for i in range(self.num_layers):
            if i == 0:
                out, h, c = self._run_bottom(emb, rest, state, fast, noise)
            else:
                out, h, c = self._run_layer(i, self.dropout(x, masks[i]), state, fast, noise)
            hs.append(h)
            cs.append(c)
            x = out + x if i >= self.residual_from else out
        return x, torch.cat(hs), torch.cat(cs)

    def _run_bottom(
        self,
        emb: Tensor,
        rest: Tensor | None,
        state: DecoderState,
        fast: FastStep | None,
        noise: LayerNoise = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The bottom layer over [emb; rest] (B, T, E + In'); on the fast path (a step) emb's
        share comes from the table rows fast[1] (B, 4H) and emb itself is not read."""
        if fast is None:
            inp = emb if rest is None else torch.cat([emb, rest.to(emb.dtype)], dim=-1)
            return self._run_layer(0, inp, state, None, noise)
        weights, rows = fast
        return self._fused_layer(0, rest, state, weights.weights[0], rows)

    def _run_layer(
        self,
        i: int,
        inp: Tensor,
        state: DecoderState,
        fast: FastStep | None = None,
        noise: LayerNoise = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i over inp (B, T, In) from its slice of state -> out (B, T, H), h, c (1, B, H).
        noise: the batch's recurrent masks per layer (custom cells), or None."""
        if fast is not None and i > 0:
            base = fast[0].biases[i]
            assert base is not None
            return self._fused_layer(i, inp, state, fast[0].weights[i], base)
        layer = self.layers[i]
        if isinstance(layer, RecurrentLayer):
            layer_noise = None if noise is None else noise[i]
            out, (h, c) = layer(inp, (state.hidden[i : i + 1], state.cell[i : i + 1]), layer_noise)
            return out, h, c
        # the cell kernels need the float weights (not, for example, a quantised module's)
        if inp.size(1) == 1 and isinstance(layer, nn.RNNBase) and self._cell_kernel(inp):
            weights = layer.all_weights[0]  # w_ih, w_hh, b_ih, b_hh of the one layer
            if self.is_lstm:
                h, c = torch.lstm_cell(inp[:, 0], (state.hidden[i], state.cell[i]), *weights)
                h, c = h.unsqueeze(0), c.unsqueeze(0)
            else:
                h = torch.gru_cell(inp[:, 0], state.hidden[i], *weights).unsqueeze(0)
                c = state.cell[i : i + 1]
            return h.transpose(0, 1), h, c
        if self.is_lstm:
            out, (h, c) = layer(inp, (state.hidden[i : i + 1], state.cell[i : i + 1]))
        else:
            out, h = layer(inp, state.hidden[i : i + 1])
            c = state.cell[i : i + 1]
        return out, h, c

    def _masks(self, batch: int, like: Tensor, steps: int = 0) -> list[Tensor | None]:
        """Dropout masks, one per layer input above the bottom and one (index 0) for the
        output vectors: variational ones (B, 1, H) sampled once so that a step loop shares
        them across time; with `steps`, plain ones too, (B, steps, H), all steps in one draw."""
        dim = self.hidden_dim
        return [self.dropout.mask(batch, dim, like, steps) for _ in range(self.num_layers)]

    # -- the arrangement, implemented by subclasses -------------------------------------------

    def _block(
        self,
        emb: Tensor,
        state: DecoderState,
        memory: EncoderMemory,
        masks: list[Tensor | None],
        fast: FastStep | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Runs steps emb (B, T, E) from `state`.

        Returns output vectors (B, T, H), new hidden (L, B, H) and cell, and attention
        weights (B, T, S). Subclasses with `loops_over_steps` accept only T = 1. `fast`
        (a step only): the fast path's weights and the previous tokens' table rows (B, 4H).
        """
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------

    @staticmethod
    def _autocast_input(emb: Tensor) -> Tensor:
        """Under autocast, the embeddings in the autocast dtype once, instead of mixed-dtype
        concatenations promoting to fp32 and kernels casting back at every step."""
        device = emb.device.type
        if torch.is_autocast_enabled(device):
            return emb.to(torch.get_autocast_dtype(device))
        return emb

    def forward(
        self, emb: Tensor, state: DecoderState, memory: EncoderMemory
    ) -> tuple[Tensor, Tensor]:
        """Teacher forcing. emb: (B, T, E) embedded tgt_in.

        Returns output vectors (B, T, H) for the output projection and attention (B, T, S).
        """
        emb = self._autocast_input(emb)
        if not self.loops_over_steps:
            masks = self._sequence_masks(memory, emb.size(0), emb)
            out, _, _, attn = self._block(emb, state, memory, masks)
            return self.dropout(out, masks[0]), attn
        masks = self._sequence_masks(memory, emb.size(0), emb, emb.size(1))
        outs, attns = [], []
        for t in range(emb.size(1)):
            step_masks = [m if m is None or m.size(1) == 1 else m[:, t : t + 1] for m in masks]
            step_memory = memory.steps(t, t + 1)  # step t's row of a wait-k mask
            out, hidden, cell, attn = self._block(emb[:, t : t + 1], state, step_memory, step_masks)
            feed = out.squeeze(1) if self.feeds_attn_vector else state.attn_vector
            state = DecoderState(hidden, cell, feed)
            outs.append(out)
            attns.append(attn)
        return self.dropout(torch.cat(outs, dim=1), masks[0]), torch.cat(attns, dim=1)

    def step(
        self,
        emb: Tensor,
        state: DecoderState,
        memory: EncoderMemory,
        fast: FastStep | None = None,
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One step. emb: (B, E) embedded previous tokens; fast: the fast path's weights
        (`step_weights`) and the previous tokens' rows of its table (B, 4H), or None.

        Returns the output vector (B, H), the new state and attention weights (B, S).
        """
        emb = self._autocast_input(emb)
        masks = self._sequence_masks(memory, emb.size(0), emb)
        out, hidden, cell, attn = self._block(emb.unsqueeze(1), state, memory, masks, fast)
        attn = attn.squeeze(1)
        feed = out.squeeze(1) if self.feeds_attn_vector else state.attn_vector
        new_state = DecoderState(hidden, cell, feed)
        return self.dropout(out, masks[0]).squeeze(1), new_state, attn


class LuongDecoder(Decoder):
    """Luong et al. (2015): global attention from the top layer's current output."""

    def __init__(
        self,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        enc_dim: int,
        attention: Attention,
        residual_from: int = 2,
        dropout: float = 0.0,
        variational: bool = False,
        bridge: str = "dense",
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
        input_feeding: bool = False,
    ) -> None:
        bottom = embed_dim + (hidden_dim if input_feeding else 0)
        super().__init__(
            cell,
            [bottom] + [hidden_dim] * (num_layers - 1),
            hidden_dim,
            enc_dim,
            attention,
            residual_from,
            dropout,
            variational,
            bridge,
            dropout_recurrent,
            weight_drop,
        )
        self.input_feeding = input_feeding
        self.loops_over_steps = input_feeding
        self.feeds_attn_vector = input_feeding
        self.combine = nn.Linear(enc_dim + hidden_dim, hidden_dim, bias=False)  # W_c, eq. 5

    def forward(
        self, emb: Tensor, state: DecoderState, memory: EncoderMemory
    ) -> tuple[Tensor, Tensor]:
        """Teacher forcing. emb: (B, T, E) embedded tgt_in.

        With input feeding, layers `input_feeding.applies` takes (every cell) and a dot or
        general score, the step loop runs as fused products with weight gradients summed once
        (`input_feeding_forward`); the plain loop over `_block` otherwise, or when
        `reference_loop` is set.

        Returns output vectors (B, T, H) for the output projection and attention (B, T, S).
        """
        keys = self.attention.bilinear_keys(memory)
        if (
            not self.input_feeding
            or self.reference_loop
            or type(self.combine) is not nn.Linear
            or not input_feeding.applies(self.layers, keys, self.residual_from)
        ):
            return super().forward(emb, state, memory)
        assert keys is not None
        emb = self._autocast_input(emb)
        masks = self._sequence_masks(memory, emb.size(0), emb, emb.size(1))
        out, attn = input_feeding.input_feeding_forward(
            emb,
            state.hidden,
            state.cell,
            state.attn_vector,
            memory,
            keys,
            self.layers,
            self.combine.weight,
            self.residual_from,
            masks,
        )
        return self.dropout(out, masks[0]), attn

    def _block(
        self,
        emb: Tensor,
        state: DecoderState,
        memory: EncoderMemory,
        masks: list[Tensor | None],
        fast: FastStep | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # sec. 3.3, input feeding: the bottom layer reads [y_{t-1}; h~_{t-1}]
        rest = state.attn_vector.unsqueeze(1) if self.input_feeding else None
        x, hidden, cell = self._stack(emb, rest, state, masks, fast, _layer_noise(memory))
        context, attn = self.attention(x, memory)  # eq. 7 and 8: a_t from h_t
        # eq. 5: h~_t = tanh(W_c [c_t; h_t])
        h_tilde = torch.tanh(self.combine(torch.cat([context.to(x.dtype), x], dim=-1)))
        return h_tilde, hidden, cell, attn


class BahdanauDecoder(Decoder):
    """Bahdanau et al. (2015): the previous top state s_{i-1} attends (eq. 6); the context
    joins the bottom layer's input (s_i = f(s_{i-1}, y_{i-1}, c_i)); the output vector is
    tanh(W_o [s_i; c_i]) (a one-layer form of the paper's deep output)."""

    loops_over_steps = True

    def __init__(
        self,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        enc_dim: int,
        attention: Attention,
        residual_from: int = 2,
        dropout: float = 0.0,
        variational: bool = False,
        bridge: str = "dense",
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__(
            cell,
            [embed_dim + enc_dim] + [hidden_dim] * (num_layers - 1),
            hidden_dim,
            enc_dim,
            attention,
            residual_from,
            dropout,
            variational,
            bridge,
            dropout_recurrent,
            weight_drop,
        )
        self.combine = nn.Linear(hidden_dim + enc_dim, hidden_dim, bias=False)  # W_o

    def _block(
        self,
        emb: Tensor,
        state: DecoderState,
        memory: EncoderMemory,
        masks: list[Tensor | None],
        fast: FastStep | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert emb.size(1) == 1, "Bahdanau attention depends on the previous step"
        query = state.hidden[-1].unsqueeze(1)  # (B, 1, H), s_{i-1}
        context, attn = self.attention(query, memory)  # eq. 5-6: alpha_ij from a(s_{i-1}, h_j)
        context = context.to(emb.dtype)
        x, hidden, cell = self._stack(emb, context, state, masks, fast, _layer_noise(memory))
        out = torch.tanh(self.combine(torch.cat([x, context.to(x.dtype)], dim=-1)))
        return out, hidden, cell, attn


class GNMTDecoder(Decoder):
    """Wu et al. (2016), sec. 3: the bottom layer's output attends and the context is
    concatenated to the input of every layer above it; the top layer's output is the output."""

    def __init__(
        self,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        enc_dim: int,
        attention: Attention,
        residual_from: int = 2,
        dropout: float = 0.0,
        variational: bool = False,
        bridge: str = "dense",
        dropout_recurrent: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__(
            cell,
            [embed_dim] + [hidden_dim + enc_dim] * (num_layers - 1),
            hidden_dim,
            enc_dim,
            attention,
            residual_from,
            dropout,
            variational,
            bridge,
            dropout_recurrent,
            weight_drop,
        )

    def _block(
        self,
        emb: Tensor,
        state: DecoderState,
        memory: EncoderMemory,
        masks: list[Tensor | None],
        fast: FastStep | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        noise = _layer_noise(memory)
        out, h, c = self._run_bottom(emb, None, state, fast, noise)
        hs, cs = [h], [c]
        x = out + emb if self.residual_from == 0 else out
        context, attn = self.attention(x, memory)  # eq. 4-6, all T steps at once
        context = context.to(x.dtype)
        for i in range(1, self.num_layers):
            inp = torch.cat([self.dropout(x, masks[i]), context], dim=-1)
            out, h, c = self._run_layer(i, inp, state, fast, noise)
            hs.append(h)
            cs.append(c)
            x = out + x if i >= self.residual_from else out
        return x, torch.cat(hs), torch.cat(cs), attn


DECODERS: dict[str, Callable[..., Decoder]] = {
    "luong": LuongDecoder,
    "bahdanau": BahdanauDecoder,
    "gnmt": GNMTDecoder,
}
