"""Translation results and length-bucketed batching, shared by the PyTorch translator
(`nmt.translate`) and the ONNX Runtime one (`nmt.runtime`); free of torch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


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
    confidence: float | None = None  # in [0, 1]: how far to trust `text` (nmt.translate)
    features: tuple[float, ...] = ()  # what the confidence is computed from


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
