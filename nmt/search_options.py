"""SearchOptions and the length rules of decoding, in plain Python: what every search obeys.

`nmt.search` (PyTorch) and `nmt.runtime` (ONNX Runtime, no torch) both decode by these rules;
`nmt.search` re-exports everything here, so `from nmt.search import SearchOptions` keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Sampling = Literal["none", "topk", "topp"]


@dataclass(frozen=True)
class SearchOptions:
    """How to decode: every choice search makes, checked once when the value is made.

    Change one with `dataclasses.replace(options, beam_size=1)`; that checks again.

    beam_size: K; 1 is greedy search. n_best: hypotheses returned per sentence (<= K).
    length_penalty, coverage_penalty: GNMT alpha and beta (Wu et al., 2016, eq. 14); in greedy
        search and sampling they change `score` only.
    min_len: EOS is not allowed before this many tokens.
    max_len_a, max_len_b: at most floor(a * |source| + b) output tokens per sentence (a target
        prefix always fits); max_len_cap: a hard bound on top of that (a server's limit).
    no_repeat_ngram: if > 0, no n-gram of this order appears twice in an output.
    sampling: "topk" draws from the top_k most likely tokens (0: all of them), "topp" from the
        smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al., 2020);
        both at `temperature` (0 means argmax). seed: makes the draws of a call reproducible.
    return_attention: fill `Hypothesis.attention`.
    """

    beam_size: int = 5
    n_best: int = 1
    length_penalty: float = 0.6
    coverage_penalty: float = 0.0
    min_len: int = 0
    max_len_a: float = 0.0
    max_len_b: float = 200.0
    max_len_cap: int | None = None
    no_repeat_ngram: int = 0
    sampling: Sampling = "none"
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None
    return_attention: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}")
        need(self.n_best >= 1, f"n_best must be >= 1, got {self.n_best}")
        need(
            self.n_best <= self.beam_size,
            f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})",
        )
        need(self.length_penalty >= 0, f"length_penalty must be >= 0, got {self.length_penalty}")
        need(
            self.coverage_penalty >= 0,
            f"coverage_penalty must be >= 0, got {self.coverage_penalty}",
        )
        need(self.min_len >= 0, f"min_len must be >= 0, got {self.min_len}")
        need(self.max_len_a >= 0, f"max_len_a must be >= 0, got {self.max_len_a}")
        need(self.max_len_b >= 0, f"max_len_b must be >= 0, got {self.max_len_b}")
        need(
            self.max_len_cap is None or self.max_len_cap >= 0,
            f"max_len_cap must be >= 0, got {self.max_len_cap}",
        )
        need(self.no_repeat_ngram >= 0, f"no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")
        need(
            self.sampling in ("none", "topk", "topp"),
            f"sampling must be none, topk or topp, got {self.sampling!r}",
        )
        need(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        if self.sampling != "none":
            need(
                self.beam_size == 1,
                f"sampling draws one output per sentence: beam_size must be 1, got "
                f"{self.beam_size}",
            )
            if self.sampling == "topk":
                need(self.top_p == 1.0, "top_p applies to sampling topp, not topk")
            else:
                need(self.top_k == 0, "top_k applies to sampling topk, not topp")
        else:
            for name, default in (("top_k", 0), ("top_p", 1.0), ("temperature", 1.0)):
                need(
                    getattr(self, name) == default,
                    f"{name} applies to sampling only; set sampling to topk or topp",
                )
            need(self.seed is None, "seed applies to sampling only; set sampling to topk or topp")

    @property
    def mode(self) -> Literal["greedy", "beam", "sample"]:
        """What `search` runs: sampling, greedy search (one beam, one output) or beam search."""
        if self.sampling != "none":
            return "sample"
        return "greedy" if self.beam_size == 1 and self.n_best == 1 else "beam"


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def max_length(src_len: int, max_len_a: float, max_len_b: float, cap: int | None = None) -> int:
    """One sentence's output limit floor(a * |source| + b), at least 0 and at most `cap`."""
    # the small epsilon keeps e.g. 1.1 * 10 from flooring to 10
    limit = max(0, math.floor(max_len_a * src_len + max_len_b + 1e-6))
    return limit if cap is None else min(limit, cap)
