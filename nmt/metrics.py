"""Corpus BLEU, chrF and TER via sacrebleu on detokenised text, with signatures and bootstrap CIs.

Scores are exactly what the `sacrebleu` command line prints for the same text and options; with
`bootstrap=n` the 95% confidence interval is sacrebleu's own (the same resamples for the same
seed as `sacrebleu --confidence --confidence-n n`), and the signature says so (`bs:n|seed:s`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric

METRICS = ("bleu", "chrf", "ter")
DEFAULT_SEED = 12345  # sacrebleu's default bootstrap seed


@dataclass(frozen=True)
class MetricScore:
    """One corpus-level score.

    name: sacrebleu's name ("BLEU", "chrF2", "TER"). score: 0-100 (TER: lower is better).
    signature: sacrebleu's reproducibility string. ci_low, ci_high: 95% bootstrap interval
    (None without bootstrap); bootstrap_mean: mean over the resamples. details: sacrebleu's
    verbose line where it has one (BLEU's n-gram precisions and brevity penalty).
    """

    name: str
    score: float
    signature: str
    ci_low: float | None = None
    ci_high: float | None = None
    bootstrap_mean: float | None = None
    details: str = ""

    def format(self, width: int = 2) -> str:
        """'BLEU = 38.50 (95% CI 31.20-45.10) nrefs:1|case:mixed|...'."""
        text = f"{self.name} = {self.score:.{width}f}"
        if self.ci_low is not None and self.ci_high is not None:
            text += f" (95% CI {self.ci_low:.{width}f}-{self.ci_high:.{width}f})"
        return f"{text} {self.signature}"

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields; the interval ones only when there is an interval."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


class CorpusScores(Mapping[str, MetricScore]):
    """Scores by metric ("bleu", "chrf", "ter"): `scores["bleu"]` is the full MetricScore,
    `scores.bleu` just its number, `scores.bleu_signature` its signature."""

    def __init__(self, by_metric: dict[str, MetricScore]) -> None:
        self._by_metric = dict(by_metric)

    def __getitem__(self, name: str) -> MetricScore:
        return self._by_metric[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_metric)

    def __len__(self) -> int:
        return len(self._by_metric)

    def __repr__(self) -> str:
        return f"CorpusScores({self._by_metric!r})"

    @property
    def bleu(self) -> float:
        return self["bleu"].score

    @property
    def chrf(self) -> float:
        return self["chrf"].score

    @property
    def ter(self) -> float:
        return self["ter"].score

    @property
    def bleu_signature(self) -> str:
        return self["bleu"].signature

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{metric: MetricScore.to_dict()}, ready for JSON."""
        return {name: score.to_dict() for name, score in self._by_metric.items()}


def _metric(name: str, tokenize: str, lowercase: bool) -> Metric:
    if name == "bleu":
        return BLEU(tokenize=tokenize, lowercase=lowercase)
    if name == "chrf":
        return CHRF(lowercase=lowercase)
    if name == "ter":
        return TER()  # sacrebleu's default: case-insensitive
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")


def _as_streams(hypotheses: Sequence[str], references: Any) -> list[list[str]]:
    """References as a list of streams (one list of sentences per reference set)."""
    if len(references) > 0 and isinstance(references[0], str):
        references = [references]
    streams = [list(stream) for stream in references]
    if not streams:
        raise ValueError("no references given")
    for i, stream in enumerate(streams):
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"reference set {i} has {len(stream)} sentences but there are "
                f"{len(hypotheses)} hypotheses"
            )
    return streams


def _score(
    metric: Metric, hypotheses: Sequence[str], streams: list[list[str]], bootstrap: int, seed: int
) -> MetricScore:
    # sacrebleu's corpus_score, split open so that the per-sentence statistics are extracted once
    # and the bootstrap seed is an argument rather than an environment variable
    stats = metric._extract_corpus_statistics(list(hypotheses), streams)
    actual = metric._aggregate_and_compute(stats)
    ci_low = ci_high = mean = None
    if bootstrap > 1:
        rng = np.random.default_rng(seed)
        idxs = rng.choice(len(stats), size=(bootstrap, len(stats)), replace=True)
        stats_np = np.array(stats, dtype="float32")
        scores = sorted(metric._compute_score_from_stats(stats_np[i].sum(0)).score for i in idxs)
        lower = bootstrap // 40  # 95%: 1/40 of the resamples cut from each end, as sacrebleu
        ci_low, ci_high = float(scores[lower]), float(scores[bootstrap - lower - 1])
        mean = float(statistics.mean(scores))
        metric.n_bootstrap = bootstrap  # type: ignore[attr-defined]  # both go in the signature
        metric.seed = str(seed)  # type: ignore[attr-defined]
    return MetricScore(
        name=actual.name,
        score=float(actual.score),
        signature=str(metric.get_signature()),
        ci_low=ci_low,
        ci_high=ci_high,
        bootstrap_mean=mean,
        details=getattr(actual, "_verbose", ""),
    )


def corpus_scores(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    metrics: Iterable[str] = METRICS,
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> CorpusScores:
    """Score detokenised hypotheses against one or more references.

    Args:
        hypotheses: one string per sentence.
        references: one string per sentence, or several reference sets (a list of such lists).
        metrics: any of "bleu", "chrf", "ter".
        tokenize: BLEU's tokenizer ("13a", "intl", "zh", "char", ...).
        lowercase: case-insensitive BLEU and chrF (TER is always case-insensitive, as sacrebleu's).
        bootstrap: resamples for the 95% confidence interval; 0 or 1 for none (1000 is usual).
        seed: bootstrap seed.
    Returns:
        The scores by metric name as asked ("bleu", ...).
    """
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    streams = _as_streams(hypotheses, references)
    return CorpusScores(
        {
            name: _score(_metric(name, tokenize, lowercase), hypotheses, streams, bootstrap, seed)
            for name in metrics
        }
    )


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> MetricScore:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing)."""
    return corpus_scores(
        hypotheses,
        references,
        ["bleu"],
        tokenize=tokenize,
        lowercase=lowercase,
        bootstrap=bootstrap,
        seed=seed,
    )["bleu"]


def corpus_chrf(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> MetricScore:
    """Corpus chrF2 (character 6-grams, beta 2)."""
    return corpus_scores(hypotheses, references, ["chrf"], bootstrap=bootstrap, seed=seed)["chrf"]


def corpus_ter(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> MetricScore:
    """Corpus TER (Tercom, case-insensitive as in sacrebleu's default); lower is better."""
    return corpus_scores(hypotheses, references, ["ter"], bootstrap=bootstrap, seed=seed)["ter"]


def read_lines(path: str | Path) -> list[str]:
    """Sentences of a UTF-8 text file, one a line, trailing whitespace removed (as sacrebleu)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip() for line in f]


def score_files(
    hypothesis_path: str | Path,
    reference_paths: str | Path | Sequence[str | Path],
    metrics: Iterable[str] = METRICS,
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> CorpusScores:
    """Score a file of detokenised hypotheses against one or more reference files.

    Raises ValueError naming the files when their line counts differ.
    """
    paths = [reference_paths] if isinstance(reference_paths, (str, Path)) else list(reference_paths)
    hypotheses = read_lines(hypothesis_path)
    streams = [read_lines(p) for p in paths]
    for path, stream in zip(paths, streams, strict=True):
        if len(stream) != len(hypotheses):
            raise ValueError(
                f"{path} has {len(stream)} lines but {hypothesis_path} has {len(hypotheses)}"
            )
    return corpus_scores(
        hypotheses,
        streams,
        metrics,
        tokenize=tokenize,
        lowercase=lowercase,
        bootstrap=bootstrap,
        seed=seed,
    )


def score_files_text(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    metrics: Iterable[str] = METRICS,
    *,
    bootstrap: int = 0,
    seed: int = DEFAULT_SEED,
) -> dict[str, dict[str, Any]]:
    """`corpus_scores` of lines already read from files, as plain JSON-ready dicts:
    {"bleu": {"name", "score", "signature"[, "ci_low", "ci_high", "bootstrap_mean"], ...}}."""
    return corpus_scores(hypotheses, references, metrics, bootstrap=bootstrap, seed=seed).to_dict()
