"""Translator: the one place where text becomes ids and ids become text again."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nmt.checkpoint import load_weights, read_model_dir
from nmt.config import Config, DecodeConfig
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.results import TranslationResult, batched
from nmt.search import EncodedSource, Ensemble, SearchOptions, search
from nmt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


CONFIDENCE_FEATURES = ("mean_token_log_prob", "abs_log_length_ratio", "unfinished")


def confidence_features(
    log_prob: float, tgt_len: int, src_len: int, finished: bool
) -> tuple[float, ...]:
    """A translation's own signals of quality, named by CONFIDENCE_FEATURES: the mean
    log-probability of its tokens (EOS included), how far its length strays from the source's,
    and whether it was cut at the length limit."""
    mean = log_prob / (tgt_len + 1) if math.isfinite(log_prob) else -50.0
    ratio = abs(math.log((tgt_len + 1) / (src_len + 1)))
    return (max(mean, -50.0), ratio, 0.0 if finished else 1.0)


def confidence(features: tuple[float, ...], calibration: dict[str, Any] | None) -> float:
    """Confidence in [0, 1]. With the model's calibration (meta.json `confidence`: a linear fit
    of sentence chrF / 100 on the dev split, written when training finishes) its prediction,
    clipped; without one, the geometric mean probability of the tokens."""
    if not calibration:
        return math.exp(features[0])
    weights = calibration["weights"]
    z = float(calibration["bias"]) + sum(float(w) * f for w, f in zip(weights, features))
    return min(1.0, max(0.0, z)) if math.isfinite(z) else 0.0


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast on the given device, or a no-op for fp32.

    Decoding runs under `torch.no_grad()`, not `inference_mode()`: autocast caches the bf16 copy
    of each weight only outside inference mode, and re-casting every step costs more than it saves.
    """
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


INT8_MOVED = (
    "int8 now runs in ONNX Runtime: `nmt export --model DIR --format onnx --int8 --out DIR2`, "
    "then translate or serve DIR2 (torch.ao.quantization is deprecated; see BENCHMARKS.md)"
)


def decode_options(cfg: DecodeConfig, length_ratio: Sequence[float] | None) -> SearchOptions:
    """A model's default SearchOptions: its decode config, with the length rule's a and b taken
    from the training data's length ratio where the config leaves them unset (a 0, b null)."""
    ratio = list(length_ratio or [1.5, 10])
    return SearchOptions(
        beam_size=cfg.beam_size,
        length_penalty=cfg.length_penalty,
        coverage_penalty=cfg.coverage_penalty,
        min_len=cfg.min_len,
        max_len_a=cfg.max_len_a or float(ratio[0]),
        max_len_b=float(cfg.max_len_b if cfg.max_len_b is not None else max(ratio[1], 1)),
        no_repeat_ngram=cfg.no_repeat_ngram,
    )


class Translator:
    """A loaded model (or ensemble) with its tokenizer and decoding defaults: the one place where
    text becomes ids and ids become text again. Thread-compatible, not thread-safe.

    `options` are the model's own decoding rules (`decode_options`); a call changes them with
    `dataclasses.replace(translator.options, ...)` and passes the result."""

    def __init__(
        self,
        model: Seq2Seq | Ensemble,
        tokenizer: Tokenizer,
        cfg: Config,
        meta: dict[str, Any] | None = None,
        device: torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        for member in _members(model):
            member.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.meta = meta or {}
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.options = decode_options(cfg.decode, self.meta.get("length_ratio"))

    @classmethod
    def load(
        cls,
        model_dir: str | Path | Sequence[str | Path],
        device: str = "cpu",
        precision: str = "fp32",
        quantize: bool = False,
    ) -> Translator:
        """Loads a model directory (config, SentencePiece model(s), safetensors weights), or
        several as an ensemble: they must share the tokenizer and the output vocabulary, and the
        first one's config and decoding rules apply."""
        dirs = (
            [Path(model_dir)] if isinstance(model_dir, str | Path) else [Path(d) for d in model_dir]
        )
        if not dirs:
            raise ValueError("no model directory given")
        dev = resolve_device(device)
        if quantize:
            raise ValueError(INT8_MOVED)
        models: list[Seq2Seq] = []
        first: tuple[Config, dict[str, Any], Tokenizer] | None = None
        for d in dirs:
            cfg, meta = read_model_dir(d)
            tokenizer = Tokenizer.load(d)
            if first is not None and tokenizer.fingerprint() != first[2].fingerprint():
                raise ValueError(
                    f"ensemble: {d} has another tokenizer than {dirs[0]} (its SentencePiece "
                    "model differs); ensemble members must share tokenizer and vocabulary"
                )
            model = build_model(
                cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.pad_id
            )
            load_weights(model, d / "model.safetensors")
            model = model.to(dev).eval()
            models.append(model)
            if first is None:
                first = (cfg, meta, tokenizer)
        assert first is not None
        cfg, meta, tokenizer = first
        if len(models) == 1:
            return cls(models[0], tokenizer, cfg, meta, dev, precision)
        try:
            ensemble = Ensemble(models)
        except ValueError as err:
            raise ValueError(f"ensemble of {', '.join(map(str, dirs))}: {err}") from None
        meta = {**meta, "ensemble": [str(d) for d in dirs]}
        return cls(ensemble, tokenizer, cfg, meta, dev, precision)

    def with_options(self, **changes: Any) -> SearchOptions:
        """The model's options with some changed (`dataclasses.replace`, checked again)."""
        return replace(self.options, **changes)

    # -- text <-> tensors ---------------------------------------------------------------------

    def _batch(
        self,
        ids: list[list[int]],
        prefixes: list[list[int]] | None = None,
        keys: list[int] | None = None,
    ) -> EncodedSource:
        ids = [seq if seq else [self.tokenizer.unk_id] for seq in ids]  # empty input still decodes
        lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)
        src = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
        for i, seq in enumerate(ids):
            src[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        src_mask = src != self.tokenizer.pad_id
        return EncodedSource(
            src.to(self.device),
            lengths,
            src_mask.to(self.device),
            self.tokenizer.bos_id,
            self.tokenizer.eos_id,
            prefixes,
            keys,
        )

    def _prefix_ids(self, prefixes: Sequence[str | None] | None, n: int) -> list[list[int]] | None:
        """The target subwords to force per text. A subword the model never outputs (outside its
        output vocabulary) is forced as <unk>, or skipped if <unk> is not an output either: the
        text still starts with the prefix as given (`_with_prefix`)."""
        if prefixes is None or not any(prefixes):
            return None
        if len(prefixes) != n:
            raise ValueError(f"{len(prefixes)} target prefixes for {n} texts")
        ids = [self.tokenizer.encode_tgt([p])[0] if p else [] for p in prefixes]
        outputs = getattr(self.model, "output_ids", None)
        if outputs is None:
            return ids
        allowed = set(outputs.tolist())
        unk = self.tokenizer.unk_id
        forced = []
        for seq in ids:
            forced.append(
                [t if t in allowed else unk for t in seq if t in allowed or unk in allowed]
            )
        return forced

    # -- translation --------------------------------------------------------------------------

    def translate(
        self,
        texts: list[str],
        options: SearchOptions | None = None,
        *,
        prefixes: Sequence[str | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[TranslationResult]:
        """Translates a batch of sentences; results come back in input order.

        Args:
            options: how to decode (default: the model's own, `self.options`).
            prefixes: per text, a target prefix the translation must start with ('' or None: no
                prefix); the output then starts with it verbatim.
            should_stop: asked between decoding steps; True ends the search with
                `SearchCancelledError`.
        """
        if not texts:
            return []
        return self.translate_ids(
            self.tokenizer.encode_src(texts), options, prefixes=prefixes, should_stop=should_stop
        )

    def translate_ids(
        self,
        ids: list[list[int]],
        options: SearchOptions | None = None,
        *,
        prefixes: Sequence[str | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        keys: list[int] | None = None,
    ) -> list[TranslationResult]:
        """`translate` for sentences already encoded (source subword ids, no BOS/EOS).

        `keys`: stable ids of the sentences (line numbers): a seeded sample of a sentence
        depends on its key, not on its place in this batch (default: 0, 1, ...)."""
        if not ids:
            return []
        options = options or self.options
        batch = self._batch(ids, self._prefix_ids(prefixes, len(ids)), keys)
        with torch.no_grad(), autocast(self.device, self.precision):
            nbest = search(self.model, batch, options, should_stop=should_stop)
        texts_out = self.tokenizer.decode_tgt([h.tokens for hyps in nbest for h in hyps])
        results = []
        k = 0
        for i, hyps in enumerate(nbest):
            decoded = texts_out[k : k + len(hyps)]
            k += len(hyps)
            if batch.prefixes is not None and prefixes is not None and prefixes[i]:
                decoded = [
                    self._with_prefix(t, prefixes[i] or "", batch.prefixes[i]) for t in decoded
                ]
            best = hyps[0]
            finished = bool(getattr(best, "finished", True))
            features = confidence_features(best.log_prob, len(best.tokens), len(ids[i]), finished)
            result = TranslationResult(
                text=decoded[0],
                score=float(best.score),
                n_best=[(t, float(h.score)) for t, h in zip(decoded, hyps)],
                finished=finished,
                confidence=confidence(features, self.meta.get("confidence")),
                features=features,
            )
            if options.return_attention:
                result.src_tokens = self.tokenizer.src_pieces(ids[i] or [self.tokenizer.unk_id])
                result.tgt_tokens = self.tokenizer.tgt_pieces(best.tokens) + ["</s>"]
                if best.attention is not None:
                    result.attention = best.attention.float()[:, : len(ids[i]) or 1].tolist()
            results.append(result)
        return results

    def _with_prefix(self, text: str, prefix: str, prefix_ids: list[int]) -> str:
        """text with its decoded prefix replaced by the prefix as given, so that the output starts
        with it exactly whatever the tokenizer's normalisation or unknown pieces made of it."""
        decoded_prefix = self.tokenizer.decode_tgt([prefix_ids])[0]
        rest = text[len(decoded_prefix) :] if text.startswith(decoded_prefix) else text
        if prefix[-1:].isspace() or rest[:1].isspace() and not decoded_prefix:
            rest = rest.lstrip()
        return prefix + rest

    def translate_stream(
        self,
        text: str,
        options: SearchOptions | None = None,
        *,
        prefix: str | None = None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] | None = None,
    ) -> TranslationResult:
        """Greedy search or sampling of one sentence, calling `on_text` with the detokenised
        translation so far whenever a new token changes it; returns the finished result.

        The same search and rules as `translate` (min length, n-gram blocking, length limits,
        prefix); beam search is refused, since its best output is only known at the end."""
        options = options or self.options
        if options.mode == "beam":
            raise ValueError("token streaming needs beam_size 1 (greedy search or sampling)")
        ids = self.tokenizer.encode_src([text])
        prefix_ids = self._prefix_ids([prefix], 1)
        batch = self._batch(ids, prefix_ids)
        tokens: list[int] = []
        shown = ""
        eos = self.tokenizer.eos_id

        def on_step(_: list[int], step_ids: Tensor) -> None:
            nonlocal shown
            token = int(step_ids[0])
            if token < 0 or token == eos:
                return
            tokens.append(token)
            so_far = self.tokenizer.decode_tgt([tokens])[0]
            if prefix and prefix_ids is not None:
                if len(tokens) < len(prefix_ids[0]):
                    return  # the prefix is shown whole, once it has been forced
                so_far = self._with_prefix(so_far, prefix, prefix_ids[0])
            if so_far != shown:
                shown = so_far
                on_text(so_far)

        with torch.no_grad(), autocast(self.device, self.precision):
            (hyps,) = search(self.model, batch, options, should_stop=should_stop, on_step=on_step)
        best = hyps[0]
        final = self.tokenizer.decode_tgt([best.tokens])[0]
        if prefix and prefix_ids is not None:
            final = self._with_prefix(final, prefix, prefix_ids[0])
        features = confidence_features(best.log_prob, len(best.tokens), len(ids[0]), best.finished)
        return TranslationResult(
            text=final,
            score=float(best.score),
            n_best=[(final, float(best.score))],
            finished=bool(best.finished),
            confidence=confidence(features, self.meta.get("confidence")),
            features=features,
        )

    def info(self) -> dict[str, Any]:
        """What the model is: languages, config, parameter counts, recorded scores."""
        members = _members(self.model)
        parameters = count_parameters(members[0])
        if len(members) > 1:
            parameters = {k: sum(count_parameters(m)[k] for m in members) for k in parameters}
        info = {
            "name": self.cfg.name,
            "src_lang": self.meta.get("src_lang", self.cfg.data.src_lang),
            "tgt_lang": self.meta.get("tgt_lang", self.cfg.data.tgt_lang),
            "parameters": parameters,
            "config": self.cfg.to_dict(),
            "scores": self.meta.get("scores", {}),
            "precision": self.precision,
            "device": str(self.device),
        }
        if len(members) > 1:
            info["ensemble"] = self.meta.get("ensemble", [])
        return info


def _members(model: Seq2Seq | Ensemble) -> list[nn.Module]:
    return list(model.models) if isinstance(model, Ensemble) else [model]


def translate_corpus(
    translator: Translator,
    lines: list[str],
    options: SearchOptions | None = None,
    *,
    batch_tokens: int | None = None,
    prefixes: Sequence[str | None] | None = None,
    first_key: int = 0,
) -> Iterator[tuple[int, TranslationResult]]:
    """Translates many lines sorted by length; yields (index, result) as each batch finishes.

    `first_key`: the key (line number) of lines[0], so that seeded samples do not depend on how
    a long input is cut into calls."""
    yield from translate_encoded(
        translator,
        translator.tokenizer.encode_src(lines),
        options,
        batch_tokens=batch_tokens,
        prefixes=prefixes,
        first_key=first_key,
    )


def translate_encoded(
    translator: Translator,
    ids: list[list[int]],
    options: SearchOptions | None = None,
    *,
    batch_tokens: int | None = None,
    prefixes: Sequence[str | None] | None = None,
    first_key: int = 0,
) -> Iterator[tuple[int, TranslationResult]]:
    """`translate_corpus` for encoded sentences: the batching that `nmt translate`, `nmt
    evaluate` and validation during training share, so that they decode identically."""
    lengths = [max(len(s), 1) for s in ids]
    order = sorted(range(len(ids)), key=lambda i: -lengths[i])
    budget = batch_tokens or translator.cfg.decode.batch_tokens
    start = time.perf_counter()
    for batch in batched(order, lengths, budget):
        results = translator.translate_ids(
            [ids[i] for i in batch],
            options,
            prefixes=None if prefixes is None else [prefixes[i] for i in batch],
            keys=[first_key + i for i in batch],
        )
        yield from zip(batch, results)
    logger.debug("translated %d sentences in %.2fs", len(ids), time.perf_counter() - start)


def word_alignment(
    src_tokens: list[str], tgt_tokens: list[str], attention: list[list[float]] | None
) -> str:
    """Word-level Pharaoh alignment (`0-0 1-2 ...`) from subword attention.

    Each target subword aligns to the source subword it attends to most; subwords are merged into
    the words they belong to (SentencePiece marks a word start with '▁'); EOS rows are skipped.
    """
    if not attention:
        return ""

    def word_ids(pieces: list[str]) -> list[int]:
        ids, word = [], -1
        for i, piece in enumerate(pieces):
            if piece.startswith("▁") or i == 0:
                word += 1
            ids.append(word)
        return ids

    src_words = word_ids(src_tokens)
    tgt_pieces = [t for t in tgt_tokens if t != "</s>"]
    tgt_words = word_ids(tgt_pieces)
    pairs = set()
    for t, row in enumerate(attention[: len(tgt_pieces)]):
        if not row:
            continue
        s = max(range(min(len(row), len(src_words))), key=row.__getitem__)
        pairs.add((src_words[s], tgt_words[t]))
    return " ".join(f"{s}-{t}" for s, t in sorted(pairs))
