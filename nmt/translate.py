"""Translator: the one place where text becomes ids and ids become text again."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from nmt.checkpoint import load_weights, read_model_dir
from nmt.config import Config
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.search import Hypothesis, beam_search, greedy_search, max_lengths
from nmt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


@dataclass
class TranslationResult:
    """One source sentence's translation, with n-best alternatives and optional alignments."""

    text: str
    score: float
    n_best: list[tuple[str, float]] = field(default_factory=list)
    src_tokens: list[str] = field(default_factory=list)
    tgt_tokens: list[str] = field(default_factory=list)
    attention: list[list[float]] | None = None  # (T, S) over subwords, EOS row included
    finished: bool = True  # False when the output hit the maximum length before EOS


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


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of the LSTM/GRU and linear layers (CPU inference only)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao; still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)


class Translator:
    """A loaded model with its tokenizer and decoding defaults; thread-compatible, not thread-safe."""

    def __init__(
        self,
        model: Seq2Seq,
        tokenizer: Tokenizer,
        cfg: Config,
        meta: dict[str, Any] | None = None,
        device: torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.meta = meta or {}
        self.device = device or torch.device("cpu")
        self.precision = precision
        ratio = self.meta.get("length_ratio") or [1.5, 10]
        self.max_len_a = cfg.decode.max_len_a or float(ratio[0])
        self.max_len_b = int(cfg.decode.max_len_b if cfg.decode.max_len_a else max(ratio[1], 1))

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        precision: str = "fp32",
        quantize: bool = False,
    ) -> Translator:
        """Loads a model directory (config, SentencePiece model(s), safetensors weights)."""
        model_dir = Path(model_dir)
        cfg, meta = read_model_dir(model_dir)
        tokenizer = Tokenizer.load(model_dir)
        model = build_model(
            cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.pad_id
        )
        load_weights(model, model_dir / "model.safetensors")
        dev = resolve_device(device)
        model = model.to(dev).eval()
        if quantize:
            if dev.type != "cpu":
                raise ValueError("int8 quantisation runs on the CPU only; use --device cpu")
            model = cast(Seq2Seq, quantize_dynamic_int8(model))
        return cls(model, tokenizer, cfg, meta, dev, precision)

    # -- text <-> tensors ---------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor, list[list[int]]]:
        ids = self.tokenizer.encode_src(texts)
        ids = [seq if seq else [self.tokenizer.unk_id] for seq in ids]  # empty input still decodes
        lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)
        src = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
        for i, seq in enumerate(ids):
            src[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        src_mask = src != self.tokenizer.pad_id
        return src.to(self.device), lengths, src_mask.to(self.device), ids

    def _search(
        self,
        src: Tensor,
        lengths: Tensor,
        src_mask: Tensor,
        beam_size: int,
        n_best: int,
        max_len_a: float,
        max_len_b: int,
        return_attention: bool,
        length_cap: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Hypothesis]]:
        d = self.cfg.decode
        with torch.no_grad(), autocast(self.device, self.precision):
            if beam_size == 1 and n_best == 1:
                hyps = greedy_search(
                    self.model, src, lengths, src_mask,
                    bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                    max_len_a=max_len_a, max_len_b=max_len_b, min_len=d.min_len,
                    return_attention=return_attention, max_len_cap=length_cap,
                    should_stop=should_stop,
                )  # fmt: skip
                return [[h] for h in hyps]
            return beam_search(
                self.model, src, lengths, src_mask,
                bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                beam_size=beam_size, n_best=n_best, length_penalty=d.length_penalty,
                coverage_penalty=d.coverage_penalty, max_len_a=max_len_a, max_len_b=max_len_b,
                min_len=d.min_len, no_repeat_ngram=d.no_repeat_ngram,
                return_attention=return_attention, max_len_cap=length_cap,
                should_stop=should_stop,
            )  # fmt: skip

    def translate(
        self,
        texts: list[str],
        *,
        beam_size: int | None = None,
        n_best: int = 1,
        max_length: int | None = None,
        return_alignments: bool = False,
        length_cap: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[TranslationResult]:
        """Translates a batch of sentences; results come back in input order.

        `length_cap` bounds the output tokens whatever `max_length` or the length rule says (a
        server's hard limit); `should_stop` is asked between decoding steps and, when it says
        True, the search ends with `SearchCancelledError`."""
        if not texts:
            return []
        beam = beam_size or self.cfg.decode.beam_size
        if n_best > beam:
            raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam})")
        src, lengths, src_mask, ids = self._encode(texts)
        a, b = (0.0, max_length) if max_length else (self.max_len_a, self.max_len_b)
        nbest = self._search(
            src, lengths, src_mask, beam, n_best, a, b, return_alignments, length_cap, should_stop
        )
        texts_out = self.tokenizer.decode_tgt([h.tokens for hyps in nbest for h in hyps])
        results = []
        k = 0
        for i, hyps in enumerate(nbest):
            decoded = texts_out[k : k + len(hyps)]
            k += len(hyps)
            best = hyps[0]
            result = TranslationResult(
                text=decoded[0],
                score=float(best.score),
                n_best=[(t, float(h.score)) for t, h in zip(decoded, hyps)],
                finished=bool(getattr(best, "finished", True)),
            )
            if return_alignments:
                result.src_tokens = self.tokenizer.src_pieces(ids[i])
                result.tgt_tokens = self.tokenizer.tgt_pieces(best.tokens) + ["</s>"]
                if best.attention is not None:
                    result.attention = best.attention.float()[:, : len(ids[i])].tolist()
            results.append(result)
        return results

    def translate_stream(self, text: str, *, length_cap: int | None = None) -> Iterator[str]:
        """Greedy decoding of one sentence, yielding the detokenised text after every token."""
        src, lengths, src_mask, ids = self._encode([text])
        max_len = max_lengths(lengths, self.max_len_a, self.max_len_b, length_cap)[0]
        tokens: list[int] = []
        model: Any = self.model
        with torch.no_grad(), autocast(self.device, self.precision):
            memory, state = model.encode(src, lengths, src_mask)
            prev = torch.full((1,), self.tokenizer.bos_id, dtype=torch.long, device=self.device)
            shown = ""
            for _ in range(max_len):
                logits, state, _ = model.step(prev, state, memory)
                token = int(model.token_ids(logits.float().argmax(-1)))
                if token == self.tokenizer.eos_id:
                    break
                tokens.append(token)
                text_so_far = self.tokenizer.decode_tgt([tokens])[0]
                if text_so_far != shown:
                    shown = text_so_far
                    yield text_so_far
                prev = torch.tensor([token], device=self.device)

    def info(self) -> dict[str, Any]:
        """What the model is: languages, config, parameter counts, recorded scores."""
        return {
            "name": self.cfg.name,
            "src_lang": self.meta.get("src_lang", self.cfg.data.src_lang),
            "tgt_lang": self.meta.get("tgt_lang", self.cfg.data.tgt_lang),
            "parameters": count_parameters(self.model),
            "config": self.cfg.to_dict(),
            "scores": self.meta.get("scores", {}),
            "precision": self.precision,
            "device": str(self.device),
        }


def batched(items: list[int], lengths: list[int], max_tokens: int) -> Iterator[list[int]]:
    """Groups indices (already sorted by length) into batches of at most max_tokens padded tokens."""
    batch: list[int] = []
    longest = 0
    for i in items:
        longest_if = max(longest, lengths[i])
        if batch and longest_if * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest_if = [], lengths[i]
        batch.append(i)
        longest = longest_if
    if batch:
        yield batch


def translate_corpus(
    translator: Translator,
    lines: list[str],
    *,
    beam_size: int | None = None,
    n_best: int = 1,
    batch_tokens: int | None = None,
    return_alignments: bool = False,
) -> Iterator[tuple[int, TranslationResult]]:
    """Translates many lines sorted by length; yields (index, result) as each batch finishes."""
    lengths = [len(s) for s in translator.tokenizer.encode_src(lines)]
    order = sorted(range(len(lines)), key=lambda i: -lengths[i])
    budget = batch_tokens or translator.cfg.decode.batch_tokens
    start = time.perf_counter()
    for batch in batched(order, [max(n, 1) for n in lengths], budget):
        results = translator.translate(
            [lines[i] for i in batch],
            beam_size=beam_size,
            n_best=n_best,
            return_alignments=return_alignments,
        )
        yield from zip(batch, results)
    logger.debug("translated %d lines in %.2fs", len(lines), time.perf_counter() - start)


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
