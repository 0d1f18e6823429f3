"""Data pipeline benchmark: encoding and batching throughput and padding on the Bible training set.

Prepares data/bible-es-en with data_scripts/bible.py when it is missing, trains (once, then reuses)
a SentencePiece model with the default tokenizer settings, then measures:

- encoding: reading, validating, SentencePiece-encoding and writing the Arrow cache (pairs/s),
  and re-opening the cache on a second run;
- batching: sampling token-bounded batches and collating them into padded tensors (pairs/s),
  over as many epochs as fit in the time budget, with the padding ratio, for bucket lengths
  fitted to the corpus (the default), lengths rounded to a multiple of 8, and exact lengths;
- bucket choices: padding and distinct padded lengths and batch shapes for several ways of
  choosing the padded lengths, on the Bible lengths and on a generated corpus of short phrases
  (3-10 subwords a side), from the sampler alone (`--padding-only` prints just these).

Prints one JSON line, then a human summary.

    python benchmarks/data.py [--batch-tokens 4096] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nmt.config import TokenizerConfig
from nmt.corpus import split_files
from nmt.data import DEFAULT_MAX_BUCKETS, Buckets, EncodedCorpus, TokenBatchSampler, iterate_batches
from nmt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def ensure_bible(corpus: Path) -> None:
    if (corpus / "train.es").is_file() and (corpus / "train.en").is_file():
        return
    print(f"preparing {corpus} with data_scripts/bible.py ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, str(ROOT / "data_scripts" / "bible.py"), "--out", str(corpus)], check=True
    )


def tokenizer_for(src: Path, tgt: Path, work_dir: Path) -> tuple[Tokenizer, float]:
    """A SentencePiece model with the default settings, trained once and kept in work_dir."""
    model_dir = work_dir / "spm"
    stamp = model_dir / "trained-on.json"
    sources = {"src": [str(src), src.stat().st_size], "tgt": [str(tgt), tgt.stat().st_size]}
    if stamp.is_file() and json.loads(stamp.read_text()) == sources:
        return Tokenizer.load(model_dir), 0.0
    start = time.perf_counter()
    tok = Tokenizer.train(src, tgt, model_dir, TokenizerConfig())
    stamp.write_text(json.dumps(sources))
    return tok, time.perf_counter() - start


def batching_epochs(
    corpus: EncodedCorpus, tok: Tokenizer, batch_tokens: int, multiple: int | None, budget_s: float
) -> dict[str, float]:
    """Samples and collates whole epochs until the time budget is used up (at least one).

    Args:
        multiple: round lengths to a multiple of this; None: buckets fitted to the corpus.
    """
    sampler = TokenBatchSampler(
        corpus.src_lengths, corpus.tgt_lengths, batch_tokens, seed=1, pad_to_multiple=multiple
    )
    pairs = batches = epochs = 0
    shapes: set[tuple[int, int, int]] = set()
    start = time.perf_counter()
    while True:
        for batch in iterate_batches(corpus, sampler, tok.pad_id, tok.bos_id, tok.eos_id):
            pairs += batch.size
            batches += 1
            shapes.add((batch.size, batch.src.size(1), batch.tgt_in.size(1)))
        epochs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            break
    padding = sampler.padding_stats(0)
    return {
        "pairs_per_s": pairs / elapsed,
        "batches_per_s": batches / elapsed,
        "epochs": epochs,
        "batches_per_epoch": len(sampler),
        "mean_pairs_per_batch": pairs / batches,
        "distinct_shapes": len(shapes),
        "padding_ratio": padding["total"],
        "padding_ratio_src": padding["src"],
        "padding_ratio_tgt": padding["tgt"],
    }


def short_phrase_lengths(n: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of a generated corpus of short phrases: 3-10 subwords a side, correlated."""
    rng = np.random.default_rng(seed)
    src = rng.integers(3, 11, n)
    return src, np.clip(src + rng.integers(-2, 3, n), 3, 10)


def quantile_buckets(src: np.ndarray, tgt: np.ndarray, k: int) -> Buckets:
    """k boundaries at evenly spaced quantiles of the pooled source and target+1 lengths."""
    pooled = np.concatenate([src, tgt + 1])
    q = np.quantile(pooled, np.arange(1, k + 1) / k, method="higher").astype(np.int64)
    return Buckets(tuple(int(x) for x in np.unique(np.append(q, pooled.max()))))


def bucket_choices(src: np.ndarray, tgt: np.ndarray, batch_tokens: int) -> list[dict[str, Any]]:
    """Padding, batches, distinct padded lengths and (B, S, T) shapes of one epoch per choice."""
    choices: dict[str, Buckets] = {
        "multiple of 8 (before)": Buckets(multiple=8),
        "exact lengths": Buckets(multiple=1),
        **{
            f"DP, {k} buckets" + (" (default)" if k == DEFAULT_MAX_BUCKETS else ""): Buckets.fit(
                src, tgt, k
            )
            for k in (12, 16, 20, 24)
        },
        **{f"quantiles, {k} buckets": quantile_buckets(src, tgt, k) for k in (16, 24)},
    }
    rows = []
    for name, buckets in choices.items():
        sampler = TokenBatchSampler(src, tgt, batch_tokens, seed=1, buckets=buckets)
        shapes, lengths = set(), set()
        for batch in sampler.all_batches(0):
            s = buckets.pad_length(int(src[batch].max()))
            t = buckets.pad_length(int(tgt[batch].max()) + 1)
            shapes.add((len(batch), s, t))
            lengths |= {s, t}
        rows.append({
            "buckets": name,
            "padding": round(sampler.padding_ratio(), 4),
            "batches": len(sampler),
            "distinct_lengths": len(lengths),
            "distinct_shapes": len(shapes),
        })  # fmt: skip
    return rows


def _shown(path: Path) -> str:
    """A path as results record it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def run(corpus_dir: Path, work_dir: Path, batch_tokens: int, max_seconds: float) -> dict[str, Any]:
    ensure_bible(corpus_dir)
    src, tgt = split_files(corpus_dir, "train", "es", "en")
    work_dir.mkdir(parents=True, exist_ok=True)
    tok, spm_s = tokenizer_for(src, tgt, work_dir)

    cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=work_dir))
    try:
        start = time.perf_counter()
        corpus = EncodedCorpus.build(src, tgt, tok, cache, max_tokens=200, max_length_ratio=3.0)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        EncodedCorpus.build(src, tgt, tok, cache, max_tokens=200, max_length_ratio=3.0)
        reopen_s = time.perf_counter() - start
        read_pairs = corpus.stats.kept + corpus.stats.total_dropped
        budget = max(0.5, max_seconds / 3)
        fitted = batching_epochs(corpus, tok, batch_tokens, None, budget)
        rounded = batching_epochs(corpus, tok, batch_tokens, 8, budget)
        exact = batching_epochs(corpus, tok, batch_tokens, 1, budget)
        buckets = {
            "bible_train": bucket_choices(corpus.src_lengths, corpus.tgt_lengths, batch_tokens),
            "short_phrases": bucket_choices(*short_phrase_lengths(), batch_tokens),
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "benchmark": "data",
        "corpus": _shown(corpus_dir),
        "pairs_read": read_pairs,
        "pairs_kept": len(corpus),
        "dropped": dict(corpus.stats.dropped),
        "vocab_size": tok.src_vocab_size,
        "spm_train_s": round(spm_s, 2),
        "encode_s": round(encode_s, 3),
        "encode_pairs_per_s": round(read_pairs / encode_s),
        "cache_reopen_s": round(reopen_s, 3),
        "batch_tokens": batch_tokens,
        "batching_fitted": {k: round(v, 4) for k, v in fitted.items()},
        "bucket_boundaries": list(corpus.buckets.boundaries),
        "bucket_choices": buckets,
        "batching_pad8": {k: round(v, 4) for k, v in rounded.items()},
        "batching_exact": {k: round(v, 4) for k, v in exact.items()},
        "threads": os.cpu_count(),
    }


def bucket_table(choices: dict[str, list[dict[str, Any]]]) -> str:
    """The bucket comparison as a plain-text table per corpus."""
    lines = []
    for corpus, rows in choices.items():
        lines.append(f"{corpus}: {'padded lengths':<34} padding  batches  lengths  shapes")
        for row in rows:
            lines.append(f"  {row['buckets']:<{len(corpus) + 34}} {row['padding']:7.2%}  "
                         f"{row['batches']:7d}  {row['distinct_lengths']:7d}  "
                         f"{row['distinct_shapes']:6d}")  # fmt: skip
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    bf, b8, b1 = r["batching_fitted"], r["batching_pad8"], r["batching_exact"]
    return "\n".join([
        f"Bible es-en training set: {r['pairs_read']} pairs read, {r['pairs_kept']} kept "
        f"(dropped: {r['dropped'] or 'none'}), SentencePiece vocabulary {r['vocab_size']}"
        + (f" (trained in {r['spm_train_s']} s)" if r["spm_train_s"] else " (reused)"),
        f"encoding into the Arrow cache: {r['encode_s']} s = {r['encode_pairs_per_s']} pairs/s; "
        f"re-opening the cache: {r['cache_reopen_s']} s",
        f"batching + collating, {r['batch_tokens']} tokens per batch, lengths fitted to "
        f"{len(r['bucket_boundaries'])} buckets: {bf['pairs_per_s']:.0f} pairs/s, padding "
        f"{bf['padding_ratio']:.1%}, {bf['distinct_shapes']:.0f} distinct batch shapes",
        f"same with lengths rounded to 8: "
        f"{b8['pairs_per_s']:.0f} pairs/s ({b8['batches_per_s']:.0f} batches/s, "
        f"{b8['mean_pairs_per_batch']:.0f} pairs/batch), padding {b8['padding_ratio']:.1%}, "
        f"{b8['distinct_shapes']:.0f} distinct batch shapes",
        f"same with exact lengths: {b1['pairs_per_s']:.0f} pairs/s, padding "
        f"{b1['padding_ratio']:.1%}, {b1['distinct_shapes']:.0f} distinct batch shapes",
        bucket_table(r["bucket_choices"]),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "bible-es-en")
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / ".bench-data",
                   help="where the benchmark keeps its SentencePiece model and temporary cache")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-seconds", type=float, default=30.0, help="time budget for batching")
    p.add_argument("--padding-only", action="store_true",
                   help="only compare bucket choices on the corpus lengths and short phrases")  # fmt: skip
    args = p.parse_args(argv)
    if args.padding_only:
        args.max_seconds = 0.0
    result = run(args.corpus, args.work_dir, args.batch_tokens, args.max_seconds)
    print(json.dumps(result))
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
