"""The served models by language pair, each with its own batching worker; reload without downtime.

A server holds one or more models (`nmt serve --model A --model B`); requests choose one by source
and target language or by name. `reload()` loads a model again from its directory in a new worker
while the old one keeps serving, swaps the two once the new one is ready, and lets the old worker
finish everything already queued on it before it stops: no request fails because of a reload.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from serve.batcher import Batcher, ServiceError, TranslatorLike
from serve.metrics import Metrics

logger = logging.getLogger(__name__)

BatcherFactory = Callable[[Callable[[], TranslatorLike], bool], Batcher]  # (load, is_reload)


class UnknownModelError(ServiceError):
    """No served model translates the asked pair (or has the asked name)."""

    status, code = 422, "unknown_model"


class ReloadError(ServiceError):
    status, code = 500, "reload_failed"


@dataclass(frozen=True)
class ServedModel:
    """One served model: its name, languages, how to load it and the worker that owns it."""

    name: str
    src_lang: str
    tgt_lang: str
    load: Callable[[], TranslatorLike]
    batcher: Batcher
    generation: int = 0  # how many times it was reloaded: part of its cache key

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"

    @property
    def cache_name(self) -> str:
        return f"{self.name}#{self.generation}"


def describe_model_dir(model_dir: str) -> tuple[str, str, str]:
    """(name, source language, target language) of a model directory ("A,B": an ensemble, as
    its first member), read from its config without loading weights; blanks if unreadable (the
    load then fails with the real error)."""
    from pathlib import Path

    from nmt.checkpoint import read_model_dir

    first = Path(model_dir.split(",")[0].strip())
    try:
        cfg, meta = read_model_dir(first)
    except Exception:  # the worker's load reports it properly
        return first.name, "", ""
    src = str(meta.get("src_lang") or cfg.data.src_lang or "")
    tgt = str(meta.get("tgt_lang") or cfg.data.tgt_lang or "")
    return str(cfg.name or first.parent.name or first.name), src, tgt


class ModelRegistry:
    """The served models, in the order given; the first is the default."""

    def __init__(self, make_batcher: BatcherFactory, metrics: Metrics) -> None:
        self._make_batcher = make_batcher
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # guards _models
        self._reload_lock = threading.Lock()  # one reload at a time

    def add(
        self, name: str, src_lang: str, tgt_lang: str, load: Callable[[], TranslatorLike]
    ) -> ServedModel:
        """Registers a model under a unique name (a taken name gets the pair, then a number)."""
        unique = name or (f"{src_lang}-{tgt_lang}" if src_lang else "model")
        if unique in self._models:
            unique = f"{name}-{src_lang}-{tgt_lang}"
        n = 2
        while unique in self._models:
            unique, n = f"{name}-{n}", n + 1
        entry = ServedModel(unique, src_lang, tgt_lang, load, self._make_batcher(load, False))
        self._models[unique] = entry
        return entry

    # -- lookup -------------------------------------------------------------------------------

    @property
    def models(self) -> list[ServedModel]:
        """The served models with their languages, taken from the loaded model where the
        directory did not say."""
        with self._lock:
            entries = list(self._models.values())
        return [_with_languages(e) for e in entries]

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def current(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    def find(
        self, source: str | None = None, target: str | None = None, name: str | None = None
    ) -> ServedModel:
        """The model with this name, or the first that translates source -> target (either may
        be None: any). Raises UnknownModelError naming what is served."""
        models = self.models
        if name is not None:
            for entry in models:
                if entry.name == name:
                    if source not in (None, entry.src_lang) or target not in (None, entry.tgt_lang):
                        raise UnknownModelError(
                            f"model {name!r} translates {entry.pair}, not "
                            f"{source or entry.src_lang}-{target or entry.tgt_lang}"
                        )
                    return entry
            raise UnknownModelError(
                f"no model named {name!r}; served: {', '.join(m.name for m in models)}"
            )
        if source is None and target is None:
            return models[0]
        for entry in models:
            if source in (None, entry.src_lang) and target in (None, entry.tgt_lang):
                return entry
        raise UnknownModelError(
            f"no model translates {source or '*'} to {target or '*'}; served language pairs: "
            f"{', '.join(m.pair for m in models)}"
        )

    def source_languages(self) -> list[str]:
        return list(dict.fromkeys(m.src_lang for m in self.models if m.src_lang))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for entry in self.models:
            entry.batcher.start()

    def stop(self, timeout_s: float) -> None:
        for entry in self.models:
            entry.batcher.stop(timeout_s)

    @property
    def ready(self) -> bool:
        return all(entry.batcher.ready for entry in self.models)

    def reload(self, name: str | None = None, timeout_s: float = 300.0) -> list[str]:
        """Loads the named model (default: all) again and swaps it in once it is ready; blocks
        (call it from a thread). The old worker finishes what was queued on it, then stops.

        Raises ReloadError when loading fails; the old model then keeps serving."""
        with self._reload_lock:
            targets = [self.find(name=name)] if name is not None else self.models
            for old in targets:
                batcher = self._make_batcher(old.load, True)
                batcher.start()
                if not batcher.wait_ready(timeout_s):
                    error = batcher.load_error or f"not ready within {timeout_s:g} s"
                    batcher.stop(5.0)
                    self.metrics.reloads.labels("failed").inc()
                    self._mark_ready()
                    raise ReloadError(
                        f"reloading {old.name} failed ({error}); the old model keeps serving"
                    )
                assert batcher.translator is not None
                info = _info(batcher.translator)
                new = replace(
                    old,
                    batcher=batcher,
                    generation=old.generation + 1,
                    src_lang=str(info.get("src_lang") or old.src_lang),
                    tgt_lang=str(info.get("tgt_lang") or old.tgt_lang),
                )
                with self._lock:
                    self._models[old.name] = new
                logger.info("reloaded %s (generation %d)", new.name, new.generation)
                self.metrics.reloads.labels("ok").inc()
                old.batcher.drain(timeout_s)
                self._mark_ready()
            return [t.name for t in targets]

    def _mark_ready(self) -> None:
        """The ready gauge says whether every served model accepts requests (a stopped old
        worker cleared it)."""
        self.metrics.ready.set(1 if self.ready else 0)


def _info(translator: TranslatorLike) -> dict[str, Any]:
    try:
        return dict(translator.info())
    except Exception:  # a translator without info still serves
        return {}


def _with_languages(entry: ServedModel) -> ServedModel:
    if entry.src_lang and entry.tgt_lang:
        return entry
    translator = entry.batcher.translator
    if translator is None:
        return entry
    info = _info(translator)
    return replace(
        entry,
        src_lang=entry.src_lang or str(info.get("src_lang") or ""),
        tgt_lang=entry.tgt_lang or str(info.get("tgt_lang") or ""),
    )
