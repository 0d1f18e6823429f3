"""Calling the search functions of `nmt.search` with keyword arguments, as the tests like to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from nmt.search import EncodedSource, SearchOptions

_DEFAULTS: dict[str, dict[str, Any]] = {
    "greedy_search": {"beam_size": 1, "length_penalty": 0.0},
    "sample": {"beam_size": 1, "length_penalty": 0.0, "sampling": "topk"},
    "beam_search": {},
    "search": {"beam_size": 1},
}


def call(
    fn: Callable[..., Any], model: Any, src: Tensor, lengths: Tensor, mask: Tensor, **kw: Any
) -> Any:
    """fn(model, EncodedSource(...), SearchOptions(...)) from one set of keyword arguments:
    bos_id, eos_id and prefixes go to the batch, should_stop and on_step to the call, the rest
    to the options (with each function's old defaults)."""
    batch = EncodedSource(src, lengths, mask, kw.pop("bos_id"), kw.pop("eos_id"),
                          kw.pop("prefixes", None))  # fmt: skip
    call_kw = {k: kw.pop(k) for k in ("should_stop", "on_step") if k in kw}
    options = SearchOptions(**{**_DEFAULTS[fn.__name__], **kw})
    return fn(model, batch, options, **call_kw)
