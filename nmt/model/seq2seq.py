"""The encoder-decoder model: encode / forward / step, build_model and parameter accounting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.config import ModelConfig, encoder_output_dim
from nmt.model.attention import EncoderMemory, build_attention, wait_k_mask
from nmt.model.decoder import DECODERS, Decoder, DecoderState
from nmt.model.dropout import Dropout
from nmt.model.encoder import Encoder, EncoderState


class Seq2Seq(nn.Module):
    """Attentional encoder-decoder. Owns the embeddings and the output projection.

    `forward` returns logits; softmax, loss and search live outside the model. The source and
    target embeddings are one matrix when `share_embeddings` (a joint vocabulary); with
    `tie_output` the output projection reuses the target embedding matrix, after a linear map
    to the embedding width when the decoder's output width differs.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_dim: int,
        pad_id: int,
        share_embeddings: bool = True,
        tie_output: bool = True,
        embed_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one joint vocabulary, got source {src_vocab_size} "
                f"and target {tgt_vocab_size} entries"
            )
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.pad_id = pad_id
        self.tie_output = tie_output
        self.src_embed = nn.Embedding(src_vocab_size, embed_dim, padding_idx=pad_id)
        self.tgt_embed = (
            None
            if share_embeddings
            else nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=pad_id)
        )
        self.embed_dropout = Dropout(embed_dropout)
        self.encoder = encoder
        self.decoder = decoder
        out_dim = decoder.output_dim
        self.out_proj = (
            nn.Linear(out_dim, embed_dim, bias=False)
            if tie_output and out_dim != embed_dim
            else None
        )
        self.out_weight = None if tie_output else nn.Parameter(torch.empty(tgt_vocab_size, out_dim))
        self.out_bias = nn.Parameter(torch.zeros(tgt_vocab_size))
        # the token id of each logit column when the softmax covers part of the vocabulary
        # (set_output_vocab); column_of maps token ids back to columns. Both are saved.
        self.output_ids: Tensor | None
        self.column_of: Tensor | None
        self.register_buffer("output_ids", None)
        self.register_buffer("column_of", None)
        self._output_cache: tuple[tuple[object, ...], Tensor, Tensor] | None = None
        self._init_embeddings(embed_dim)

    def set_output_vocab(self, token_ids: Tensor | None, unk_id: int) -> None:
        """Restricts the softmax to `token_ids` (one logit column each, in ascending id order),
        or lifts the restriction (None). Target tokens outside the set are scored as UNK.

        The parameters keep their full-vocabulary shapes: the output rows of the other tokens
        are simply not used, so checkpoints and averaging work the same either way; the set
        itself is saved with the weights (`output_ids`).
        """
        self._output_cache = None
        if token_ids is None:
            self.output_ids = self.column_of = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique().cpu()
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.tgt_vocab_size:
            raise ValueError(
                f"output vocabulary ids must lie in [0, {self.tgt_vocab_size}), got "
                f"{ids.numel()} ids"
                + (f" from {int(ids[0])} to {int(ids[-1])}" if len(ids) else "")
            )
        if not bool((ids == unk_id).any()):
            raise ValueError(f"the output vocabulary must contain UNK (id {unk_id})")
        column_of = torch.full((self.tgt_vocab_size,), int((ids == unk_id).nonzero()[0, 0]))
        column_of[ids] = torch.arange(ids.numel())
        device = self.out_bias.device
        self.output_ids, self.column_of = ids.to(device), column_of.to(device)

    def prepare_output_vocab(self, size: int | None) -> None:
        """Placeholders for an output vocabulary of `size` tokens (None: the full vocabulary),
        for a weights file to be loaded into."""
        self._output_cache = None
        if size is None:
            self.output_ids = self.column_of = None
            return
        device = self.out_bias.device
        self.output_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.column_of = torch.zeros(self.tgt_vocab_size, dtype=torch.long, device=device)

    @property
    def num_outputs(self) -> int:
        """Logit columns: the output vocabulary's size, or the whole target vocabulary's."""
        return self.tgt_vocab_size if self.output_ids is None else self.output_ids.numel()

    def token_ids(self, columns: Tensor) -> Tensor:
        """Token ids of logit columns (any shape)."""
        return columns if self.output_ids is None else self.output_ids[columns]

    def _init_embeddings(self, embed_dim: int) -> None:
        # N(0, 1/E) keeps tied logits near unit scale at the start
        for embed in (self.src_embed, self.tgt_embed):
            if embed is not None:
                nn.init.normal_(embed.weight, std=embed_dim**-0.5)
                with torch.no_grad():
                    embed.weight[self.pad_id].zero_()
        if self.out_weight is not None:
            nn.init.normal_(self.out_weight, std=self.out_weight.size(1) ** -0.5)

    @property
    def target_embedding(self) -> nn.Embedding:
        return self.src_embed if self.tgt_embed is None else self.tgt_embed

    def output_logits(self, out: Tensor) -> Tensor:
        """Output projection over any leading shape: out (..., H) -> logits (..., V), with V
        = `num_outputs` columns (see `set_output_vocab`)."""
        if self.out_proj is not None:
            out = self.out_proj(out)
        weight, bias = self.output_weights()
        return F.linear(out, weight, bias)

    def output_weights(self) -> tuple[Tensor, Tensor]:
        """The output matrix and bias, restricted to the output vocabulary's rows.

        Without gradients (decoding) the restricted rows are gathered, and cast to the autocast
        dtype, once and kept until the weights change, rather than at every step."""
        weight = self.target_embedding.weight if self.out_weight is None else self.out_weight
        ids = self.output_ids
        if ids is None:
            return weight, self.out_bias
        if torch.is_grad_enabled():
            return weight.index_select(0, ids), self.out_bias.index_select(0, ids)
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (weight.data_ptr(), weight._version, self.out_bias._version, ids.data_ptr(), dtype)
        if self._output_cache is None or self._output_cache[0] != key:
            rows, bias = weight.index_select(0, ids), self.out_bias.index_select(0, ids)
            if dtype is not None:
                rows, bias = rows.to(dtype), bias.to(dtype)
            self._output_cache = (key, rows, bias)
        return self._output_cache[1], self._output_cache[2]

    def encode(
        self, src: Tensor, src_lengths: Tensor, src_mask: Tensor, wait_k: int | Tensor | None = None
    ) -> tuple[EncoderMemory, DecoderState]:
        """Encodes a padded batch once for decoding.

        Args:
            src: (B, S) long; src_lengths: (B,) long; src_mask: (B, S) bool, True on real tokens.
            wait_k: k of a wait-k decoder (a `uni` encoder only): its initial state comes from
                the encoder's state after the first min(k, |x|) tokens, all it has read then;
                a (B,) long tensor gives each row its own k.
        Returns:
            The encoder memory (keys projected once) and the decoder's initial state.
        """
        emb = self.embed_dropout(self.src_embed(src))  # (B, S, E)
        enc_out, final = self.encoder(emb, src_lengths)  # (B, S, He), (B, He)
        if wait_k is not None:
            if not self.encoder.streaming:
                raise ValueError("wait-k needs an encoder with layout 'uni'")
            k = wait_k.to(enc_out.device) if isinstance(wait_k, Tensor) else wait_k
            read = src_lengths.to(enc_out.device).clamp(max=k) - 1  # (B,)
            final = enc_out[torch.arange(enc_out.size(0), device=enc_out.device), read]
        keys = self.decoder.attention.project_keys(enc_out)
        # training: the decoder's per-sequence dropout masks, drawn once for all its steps
        noise = self.decoder.sample_noise(src.size(0), emb)
        memory = EncoderMemory(enc_out, src_mask, keys, noise)
        return memory, self.decoder.init_state(final)

    def _teacher_forced(
        self,
        src: Tensor,
        src_lengths: Tensor,
        src_mask: Tensor,
        tgt_in: Tensor,
        wait_k: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decoder output vectors (B, T, H) and attention (B, T, S) under teacher forcing;
        with `wait_k`, step t reads the first t + k source tokens only."""
        memory, state = self.encode(src, src_lengths, src_mask, wait_k)
        if wait_k is not None:
            mask = wait_k_mask(tgt_in.size(1), src.size(1), wait_k, src.device)
            memory = memory._replace(read_mask=mask)
        emb = self.embed_dropout(self.target_embedding(tgt_in))  # (B, T, E)
        return self.decoder(emb, state, memory)

    def forward_with_attention(
        self,
        src: Tensor,
        src_lengths: Tensor,
        src_mask: Tensor,
        tgt_in: Tensor,
        wait_k: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Teacher forcing. tgt_in: (B, T) = BOS + y. Returns logits (B, T, V), attn (B, T, S).
        wait_k: step t attends to the first t + k source tokens only (a `uni` encoder)."""
        out, attn = self._teacher_forced(src, src_lengths, src_mask, tgt_in, wait_k)
        return self.output_logits(out), attn  # the projection runs once over all positions

    def features(
        self,
        src: Tensor,
        src_lengths: Tensor,
        src_mask: Tensor,
        tgt_in: Tensor,
        wait_k: int | Tensor | None = None,
    ) -> Tensor:
        """Teacher forcing up to, not including, the output matrix: (B, T, D) vectors with
        logits = F.linear(features, *self.output_weights()). D is the embedding width where
        `out_proj` maps the decoder output to it, else the decoder's output width. For a loss
        fused with the projection (`nmt.loss.fused_linear_smoothed_nll`)."""
        out = self._teacher_forced(src, src_lengths, src_mask, tgt_in, wait_k)[0]  # (B, T, H)
        return out if self.out_proj is None else self.out_proj(out)

    def forward(
        self,
        src: Tensor,
        src_lengths: Tensor,
        src_mask: Tensor,
        tgt_in: Tensor,
        features: bool = False,
        wait_k: int | Tensor | None = None,
    ) -> Tensor:
        """Teacher forcing on the fastest correct path. Returns logits (B, T, V), or with
        `features` the output matrix's inputs (B, T, D) instead (see `features`): a wrapper
        such as DistributedDataParallel must see the forward it syncs gradients for.
        `wait_k`: wait-k teacher forcing (see `forward_with_attention`)."""
        if features:
            return self.features(src, src_lengths, src_mask, tgt_in, wait_k)
        return self.forward_with_attention(src, src_lengths, src_mask, tgt_in, wait_k)[0]

    def encode_more(
        self, src: Tensor, state: EncoderState | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, EncoderState]:
        """Encodes the next source tokens of a live source (a `uni` encoder): the same outputs
        and keys as `encode` computes for those positions of the whole sentence.

        Args:
            src: (B, S') long, the next S' >= 1 tokens; state: from the last call, or None at
                the start; lengths: (B,) the number of row b's tokens, the rest padding (an
                encoder with `ragged_advance` only), or None (no padding).
        Returns:
            enc_out (B, S', He), their keys (B, S', Ha) or None (dot score), the new state
            (after each row's own tokens).
        """
        emb = self.embed_dropout(self.src_embed(src))  # (B, S', E)
        enc_out, state = self.encoder.advance(emb, state, lengths)
        return enc_out, self.decoder.attention.project_keys(enc_out), state

    def decode_step(
        self, prev_tokens: Tensor, state: DecoderState, memory: EncoderMemory
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoding step up to, not including, the output projection. prev_tokens: (B,).

        Returns the output vectors (B, H) for `output_logits`, the new state and attention
        weights (B, S). Search projects the vectors block by block (see `nmt.search`).
        """
        emb = self.embed_dropout(self.target_embedding(prev_tokens))  # (B, E)
        weights = self.decoder.step_weights(self.target_embedding.weight)
        fast = None if weights is None else (weights, weights.table.index_select(0, prev_tokens))
        return self.decoder.step(emb, state, memory, fast)

    def step(
        self, prev_tokens: Tensor, state: DecoderState, memory: EncoderMemory
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One decoding step. prev_tokens: (B,) long.

        Returns logits (B, V) (V = `num_outputs` columns), the new state and attention
        weights (B, S).
        """
        out, state, attn = self.decode_step(prev_tokens, state, memory)
        return self.output_logits(out), state, attn


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int) -> Seq2Seq:
    """Turns the model section of the config into a Seq2Seq."""
    enc, dec, att = cfg.encoder, cfg.decoder, cfg.attention
    encoder = Encoder(
        cfg.cell,
        cfg.embed_dim,
        enc.hidden_dim,
        enc.num_layers,
        layout=enc.layout,
        residual_from=enc.residual_from,
        dropout=enc.dropout,
        variational=enc.variational,
        dropout_recurrent=enc.dropout_recurrent,
        weight_drop=enc.weight_drop,
    )
    enc_dim = encoder_output_dim(cfg)
    assert enc_dim == encoder.output_dim
    attention = build_attention(att.score, dec.hidden_dim, enc_dim, att.dim or dec.hidden_dim)
    extra = {"input_feeding": dec.input_feeding} if att.type == "luong" else {}
    decoder = DECODERS[att.type](
        cell=cfg.cell,
        embed_dim=cfg.embed_dim,
        hidden_dim=dec.hidden_dim,
        num_layers=dec.num_layers,
        enc_dim=enc_dim,
        attention=attention,
        residual_from=dec.residual_from,
        dropout=dec.dropout,
        variational=dec.variational,
        bridge=dec.bridge,
        dropout_recurrent=dec.dropout_recurrent,
        weight_drop=dec.weight_drop,
        **extra,
    )
    return Seq2Seq(
        encoder,
        decoder,
        src_vocab_size,
        tgt_vocab_size,
        cfg.embed_dim,
        pad_id,
        share_embeddings=cfg.share_embeddings,
        tie_output=cfg.tie_output,
        embed_dropout=cfg.embed_dropout,
    )


# parameter-name prefixes of each component, most specific first
_COMPONENTS = [
    ("src_embed.", "embeddings"),
    ("tgt_embed.", "embeddings"),
    ("encoder.", "encoder"),
    ("decoder.attention.", "attention"),
    ("decoder.combine.", "attention"),
    ("decoder.bridge.", "bridge"),
    ("decoder.layers.", "decoder"),
    ("out_", "output"),
]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of a Seq2Seq per component (embeddings, encoder, attention, decoder, bridge,
    output) and the total; a shared or tied tensor is counted once. Wrappers (DDP's `module.`,
    torch.compile's `_orig_mod.`) are looked through."""
    counts = dict.fromkeys(["embeddings", "encoder", "attention", "decoder", "bridge", "output"], 0)
    for full_name, param in model.named_parameters():  # yields each tensor once
        name = full_name.removeprefix("module.").removeprefix("_orig_mod.")
        component = next((c for prefix, c in _COMPONENTS if name.startswith(prefix)), None)
        assert component is not None, f"parameter {name} belongs to no component"
        counts[component] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
