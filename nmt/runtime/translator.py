"""OnnxTranslator: an exported model directory as a translator, with no PyTorch installed.

Called like `nmt.translate.Translator` (`translate`, `translate_ids`, `options`, `tokenizer`,
`cfg`, `info`), so `nmt translate`, `nmt evaluate` and the service's batcher use it the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nmt.config import Config, ConfigError, load_config
from nmt.results import TranslationResult, batched
from nmt.runtime.files import CONFIG_FILE, META_FILE, ExportedModelError, read_manifest
from nmt.runtime.model import OnnxModel
from nmt.runtime.search import check_supported, search
from nmt.search_options import SearchOptions
from nmt.tokenizer import Tokenizer, TokenizerError


class OnnxTranslator:
    """An exported model with its tokenizer and decoding defaults (`options`, as exported)."""

    def __init__(self, model_dir: str | Path, threads: int = 0) -> None:
        """Loads an exported directory; ExportedModelError names a missing or broken file."""
        self.model_dir = Path(model_dir)
        manifest = read_manifest(self.model_dir)
        self.manifest = manifest
        try:
            self.cfg: Config = load_config(self.model_dir / CONFIG_FILE)
        except ConfigError as err:
            raise ExportedModelError(str(err)) from None
        try:
            self.tokenizer = Tokenizer.load(self.model_dir)
        except TokenizerError as err:
            raise ExportedModelError(str(err)) from None
        meta_path = self.model_dir / META_FILE
        self.meta: dict[str, Any] = (
            json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        )
        try:
            self.model = OnnxModel(self.model_dir, manifest, threads)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportedModelError(f"cannot load the graphs in {self.model_dir}: {err}") from None
        self.options = SearchOptions(**manifest["options"])
        self.precision = f"onnx-{manifest.get('precision', 'fp32')}"

    @classmethod
    def load(cls, model_dir: str | Path, threads: int = 0) -> OnnxTranslator:
        return cls(model_dir, threads)

    def with_options(self, **changes: Any) -> SearchOptions:
        """The model's options with some changed (`dataclasses.replace`, checked again)."""
        return replace(self.options, **changes)

    def _batch(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = [seq if seq else [self.tokenizer.unk_id] for seq in ids]  # empty input still decodes
        lengths = np.asarray([len(s) for s in ids], dtype=np.int64)
        src = np.full((len(ids), int(lengths.max())), self.tokenizer.pad_id, dtype=np.int64)
        for i, seq in enumerate(ids):
            src[i, : len(seq)] = seq
        return src, lengths

    def translate(
        self,
        texts: list[str],
        options: SearchOptions | None = None,
        *,
        prefixes: Sequence[str | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[TranslationResult]:
        """Translates a batch of sentences; results come back in input order."""
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
        """`translate` for sentences already encoded (source subword ids, no BOS/EOS). `keys`
        is accepted for the PyTorch translator's signature; it only matters to sampling."""
        if prefixes is not None and any(prefixes):
            raise ValueError(
                "target prefixes are not implemented in the ONNX runtime; decode the PyTorch "
                "model directory to force a prefix"
            )
        if not ids:
            return []
        options = options or self.options
        check_supported(options)
        src, lengths = self._batch(ids)
        tok = self.tokenizer
        nbest = search(self.model, src, lengths, tok.bos_id, tok.eos_id, options,
                       should_stop=should_stop)  # fmt: skip
        texts_out = tok.decode_tgt([h.tokens for hyps in nbest for h in hyps])
        results, k = [], 0
        for i, hyps in enumerate(nbest):
            decoded = texts_out[k : k + len(hyps)]
            k += len(hyps)
            best = hyps[0]
            result = TranslationResult(
                text=decoded[0],
                score=float(best.score),
                n_best=[(t, float(h.score)) for t, h in zip(decoded, hyps, strict=True)],
                finished=best.finished,
            )
            if options.return_attention:
                result.src_tokens = tok.src_pieces(ids[i] or [tok.unk_id])
                result.tgt_tokens = tok.tgt_pieces(best.tokens) + ["</s>"]
                if best.attention is not None:
                    result.attention = best.attention[:, : len(ids[i]) or 1].tolist()
            results.append(result)
        return results

    def translate_corpus(
        self,
        lines: list[str],
        options: SearchOptions | None = None,
        *,
        batch_tokens: int | None = None,
    ) -> list[TranslationResult]:
        """Translates many lines in input order, sorted by length into batches of at most
        `batch_tokens` padded source tokens (default: the model's decode.batch_tokens), as
        `nmt.translate.translate_corpus` batches them."""
        ids = self.tokenizer.encode_src(lines)
        lengths = [max(len(s), 1) for s in ids]
        order = sorted(range(len(ids)), key=lambda i: -lengths[i])
        budget = batch_tokens or self.cfg.decode.batch_tokens
        results: list[TranslationResult | None] = [None] * len(ids)
        for batch in batched(order, lengths, budget):
            for i, result in zip(batch, self.translate_ids([ids[i] for i in batch], options)):
                results[i] = result
        return [r for r in results if r is not None]

    def translate_stream(
        self,
        text: str,
        options: SearchOptions | None = None,
        *,
        prefix: str | None = None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] | None = None,
    ) -> TranslationResult:
        """Not implemented in the ONNX runtime: raises ValueError saying so."""
        raise ValueError(
            "token streaming is not implemented in the ONNX runtime; use /v1/translate, or "
            "serve the PyTorch model directory"
        )

    def info(self) -> dict[str, Any]:
        """What the model is: languages, config, parameter counts, recorded scores."""
        return {
            "name": self.cfg.name,
            "src_lang": self.meta.get("src_lang", self.cfg.data.src_lang),
            "tgt_lang": self.meta.get("tgt_lang", self.cfg.data.tgt_lang),
            "parameters": self.manifest.get("parameters", {}),
            "config": self.cfg.to_dict(),
            "scores": self.meta.get("scores", {}),
            "precision": self.precision,
            "device": "cpu (onnxruntime)",
        }
