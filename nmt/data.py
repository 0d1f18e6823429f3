"""Encoded corpus cache (Arrow, memory-mapped), the Batch, bucket lengths, the token-bounded sampler."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from nmt.corpus import CorpusError, FilterStats, log_filter_stats, read_parallel, require_file
from nmt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cache layout or the encoding changes
ENCODE_CHUNK = 20_000  # pairs encoded (and held in memory) at a time
DATA_FILE = "data.arrow"
META_FILE = "meta.json"
DEFAULT_PAD_TO_MULTIPLE = 8  # past the last bucket boundary, lengths round up to a multiple
DEFAULT_MAX_BUCKETS = 16  # padded lengths per corpus: few shapes keep oneDNN's kernel cache warm
_MAX_CANDIDATES = 1024  # boundary candidates the dynamic programme considers (bounds its cost)

_SCHEMA = pa.schema(
    [("src", pa.list_(pa.int32())), ("tgt", pa.list_(pa.int32())), ("line", pa.int64())]
)


# ---------------------------------------------------------------------------------------------
# Batch


@dataclass
class Batch:
    """A padded batch. `tgt_in` is BOS + y and `tgt_out` is y + EOS, both padded with pad_id."""

    src: Tensor  # (B, S) long
    src_lengths: Tensor  # (B,) long, always on the CPU (what pack_padded_sequence wants)
    src_mask: Tensor  # (B, S) bool, True on real tokens
    tgt_in: Tensor  # (B, T) long
    tgt_out: Tensor  # (B, T) long
    indices: Tensor  # (B,) long, example ids in the EncodedCorpus; stays on the CPU
    num_tgt_tokens: int  # non-pad positions of tgt_out (target tokens + EOS)

    @property
    def size(self) -> int:
        return int(self.src.size(0))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with its token tensors on `device`; lengths and indices stay on the CPU."""
        return Batch(
            src=self.src.to(device, non_blocking=non_blocking),
            src_lengths=self.src_lengths,
            src_mask=self.src_mask.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
            indices=self.indices,
            num_tgt_tokens=self.num_tgt_tokens,
        )

    def pin_memory(self) -> Batch:
        """The batch in pinned host memory, for asynchronous copies to a GPU."""
        return Batch(
            src=self.src.pin_memory(),
            src_lengths=self.src_lengths,
            src_mask=self.src_mask.pin_memory(),
            tgt_in=self.tgt_in.pin_memory(),
            tgt_out=self.tgt_out.pin_memory(),
            indices=self.indices,
            num_tgt_tokens=self.num_tgt_tokens,
        )


@dataclass(frozen=True)
class Buckets:
    """The lengths a batch is padded to: up to the next boundary, past the last one to a multiple.

    Few distinct padded lengths keep oneDNN's per-shape kernel cache warm; boundaries fitted to a
    corpus's length distribution (`Buckets.fit`) keep padding low on any corpus, where rounding to
    a multiple of 8 alone pads a corpus of short phrases (3-10 subwords) by a third.
    `Buckets(multiple=m)` with no boundaries rounds every length up to a multiple of m (1: exact
    lengths).
    """

    boundaries: tuple[int, ...] = ()  # ascending padded lengths
    multiple: int = DEFAULT_PAD_TO_MULTIPLE  # for lengths past the last boundary

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise ValueError(f"Buckets.multiple must be positive, got {self.multiple}")
        b = self.boundaries
        if any(x < 1 for x in b) or any(y <= x for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"Buckets.boundaries must be positive and ascending, got {b}")

    @classmethod
    def fit(
        cls,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> Buckets:
        """At most `max_buckets` boundaries that minimise the padding of a corpus's examples.

        Source lengths and target lengths plus one (BOS + y, y + EOS) are pooled, since both sides
        are padded to the same boundaries, and the boundaries are chosen by dynamic programming
        to minimise the total of (boundary - length) over all of them; the longest length is
        always a boundary. Deterministic: a pure function of the lengths.
        """
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be positive, got {max_buckets}")
        src = np.asarray(src_lengths, dtype=np.int64)
        tgt = np.asarray(tgt_lengths, dtype=np.int64) + 1
        counts = np.bincount(src, minlength=1) if len(src) else np.zeros(1, dtype=np.int64)
        tgt_counts = np.bincount(tgt) if len(tgt) else np.zeros(1, dtype=np.int64)
        size = max(len(counts), len(tgt_counts))
        hist = np.zeros(size, dtype=np.int64)
        hist[: len(counts)] += counts
        hist[: len(tgt_counts)] += tgt_counts
        hist[0] = 0  # an empty source is never collated
        return cls(tuple(optimal_boundaries(hist, max_buckets)))

    def pad(self, lengths: np.ndarray) -> np.ndarray:
        """The padded length of each of `lengths` (an int array of any shape)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        out = -(-lengths // self.multiple) * self.multiple
        if self.boundaries:
            bounds = np.asarray(self.boundaries, dtype=np.int64)
            table = bounds[np.searchsorted(bounds, np.arange(bounds[-1] + 1), side="left")]
            inside = lengths <= bounds[-1]
            out[inside] = table[lengths[inside]]  # a lookup: faster than a search per length
        return out

    def pad_length(self, length: int) -> int:
        """The padded length of one length."""
        return int(self.pad(np.asarray([length]))[0])

    def fingerprint(self) -> int:
        """A checksum of the boundaries and multiple, for resume checks."""
        data = np.asarray([*self.boundaries, -self.multiple], dtype=np.int64).tobytes()
        return zlib.crc32(data)


def optimal_boundaries(hist: np.ndarray, max_buckets: int) -> list[int]:
    """Boundaries minimising sum over lengths l of hist[l] * (next boundary >= l, minus l).

    Dynamic programming over the lengths that occur (at most `_MAX_CANDIDATES` of them, taken at
    quantiles of the distribution when there are more): cost[k][j] is the least padding of all
    lengths up to candidate j with k boundaries, the last at candidate j. O(K x M^2) in numpy.

    Args:
        hist: (M,) int, hist[l] = number of sequences of length l.
    Returns:
        At most `max_buckets` ascending boundaries; the longest length occurring is the last.
    """
    lengths = np.flatnonzero(hist)
    if len(lengths) == 0:
        return []
    cands = lengths
    if len(cands) > _MAX_CANDIDATES:  # boundaries at quantiles of the distribution, plus the max
        cum = np.cumsum(hist[lengths])
        levels = np.linspace(0, cum[-1], _MAX_CANDIDATES, endpoint=False)[1:]
        picks = np.searchsorted(cum, levels, side="left")
        cands = np.unique(np.concatenate([lengths[picks], lengths[-1:]]))
    # group every length with the smallest candidate at or above it
    group = np.searchsorted(cands, lengths, side="left")
    n = np.bincount(group, weights=hist[lengths], minlength=len(cands))
    total = np.bincount(group, weights=hist[lengths] * lengths, minlength=len(cands))
    cn = np.concatenate([[0.0], np.cumsum(n)])  # (M+1,) prefix counts
    cs = np.concatenate([[0.0], np.cumsum(total)])  # (M+1,) prefix length sums
    m = len(cands)
    values = cands.astype(np.float64)
    # seg[a, j]: padding of the lengths in groups a..j when all go to candidate j (a <= j)
    seg = values[None, :] * (cn[None, 1:] - cn[:m, None]) - (cs[None, 1:] - cs[:m, None])
    seg[np.tril_indices(m, -1)] = np.inf
    cost = seg[0].copy()  # one boundary: everything up to j goes to j
    choices = [np.zeros(m, dtype=np.int64)]
    for _ in range(1, min(max_buckets, m)):
        # previous boundary at a - 1, the new one at j covers groups a..j
        best = np.concatenate([[np.inf], cost[:-1]])[:, None] + seg  # (a, j)
        arg = best.argmin(axis=0)
        new = best[arg, np.arange(m)]
        improved = new < cost
        if not improved.any():
            break
        choices.append(np.where(improved, arg, -1))
        cost = np.minimum(cost, new)
    # walk back from the last candidate
    out, j, k = [], m - 1, len(choices) - 1
    while j >= 0:
        out.append(int(cands[j]))
        while k > 0 and choices[k][j] < 0:
            k -= 1
        a = int(choices[k][j]) if k > 0 else 0
        j, k = a - 1, k - 1
    return out[::-1]


def collate(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    indices: Sequence[int],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    padding: Buckets | int = DEFAULT_PAD_TO_MULTIPLE,
) -> Batch:
    """Pads (source ids, target ids) pairs into a Batch.

    Args:
        examples: B pairs of id lists, without BOS/EOS.
        indices: the B example ids, kept in `Batch.indices`.
        padding: the padded lengths S and T are the longest lengths rounded up by these Buckets
            (an int m: to a multiple of m), so that batches come in few shapes; the sampler pads
            the same way, so its token bound holds.
    """
    src_lengths = np.fromiter((len(s) for s, _ in examples), dtype=np.int64, count=len(examples))
    tgt_lengths = np.fromiter((len(t) for _, t in examples), dtype=np.int64, count=len(examples))
    src_values = np.fromiter((i for s, _ in examples for i in s), dtype=np.int64)
    tgt_values = np.fromiter((i for _, t in examples for i in t), dtype=np.int64)
    return _collate_flat(
        src_values, src_lengths, tgt_values, tgt_lengths, np.asarray(indices, dtype=np.int64),
        pad_id, bos_id, eos_id, as_buckets(padding),
    )  # fmt: skip


def as_buckets(padding: Buckets | int) -> Buckets:
    """Buckets as given, or an int m as `Buckets(multiple=m)` (round up to a multiple of m)."""
    return padding if isinstance(padding, Buckets) else Buckets(multiple=int(padding))


def _collate_flat(
    src_values: np.ndarray,
    src_lengths: np.ndarray,
    tgt_values: np.ndarray,
    tgt_lengths: np.ndarray,
    indices: np.ndarray,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    padding: Buckets,
) -> Batch:
    """Builds a Batch from concatenated ids and per-example lengths, without Python loops."""
    if len(src_lengths) == 0:
        raise ValueError("cannot collate an empty batch")
    if src_lengths.min() < 1:
        raise ValueError("cannot collate an example with an empty source")
    n = len(src_lengths)
    width_s = padding.pad_length(int(src_lengths.max()))
    width_t = padding.pad_length(int(tgt_lengths.max()) + 1)

    src_mask = np.arange(width_s) < src_lengths[:, None]  # (B, S)
    src = np.full((n, width_s), pad_id, dtype=np.int64)
    src[src_mask] = src_values

    tgt_mask = np.arange(width_t) < tgt_lengths[:, None]  # (B, T) real target tokens
    tgt_out = np.full((n, width_t), pad_id, dtype=np.int64)
    tgt_out[tgt_mask] = tgt_values
    tgt_out[np.arange(n), tgt_lengths] = eos_id
    tgt_in = np.full((n, width_t), pad_id, dtype=np.int64)
    tgt_in[:, 0] = bos_id
    tgt_in[:, 1:][tgt_mask[:, :-1]] = tgt_values

    return Batch(
        src=torch.from_numpy(src),
        src_lengths=torch.from_numpy(src_lengths.astype(np.int64)),
        src_mask=torch.from_numpy(src_mask),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        indices=torch.from_numpy(indices.astype(np.int64)),
        num_tgt_tokens=int(tgt_lengths.sum()) + n,
    )


# ---------------------------------------------------------------------------------------------
# Encoded corpus


def file_digest(path: str | Path) -> str:
    """BLAKE2b of the whole file content (about a gigabyte a second)."""
    h = hashlib.blake2b(digest_size=20)
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def drop_codes(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, max_length_ratio: float
) -> np.ndarray:
    """Vectorised `nmt.corpus.drop_reason`: 0 keep, 1 empty, 2 too_long, 3 length_ratio."""
    longer = np.maximum(src_lengths, tgt_lengths)
    shorter = np.minimum(src_lengths, tgt_lengths)
    codes = np.zeros(len(longer), dtype=np.int8)
    if max_length_ratio:
        codes[longer > max_length_ratio * shorter] = 3
    if max_tokens:
        codes[longer > max_tokens] = 2
    codes[shorter == 0] = 1
    return codes


_REASONS = {1: "empty", 2: "too_long", 3: "length_ratio"}


class EncodedCorpus:
    """Subword ids of a parallel corpus in a memory-mapped Arrow file, with length arrays.

    Rows are the pairs that passed the filters, in file order; `lines[i]` is row i's 0-based line
    number in the input files.
    """

    def __init__(self, path: str | Path) -> None:
        """Opens a cache folder written by `build`."""
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / META_FILE).read_text("utf-8"))
        self.dataset = datasets.Dataset.from_file(str(self.path / DATA_FILE))
        self._arrow = self.dataset.with_format("arrow")
        table = self.dataset.data
        self.src_lengths = _list_lengths(table.column("src"))  # (N,) int64
        self.tgt_lengths = _list_lengths(table.column("tgt"))  # (N,) int64
        self.lines = table.column("line").to_numpy()  # (N,) int64
        self.stats = FilterStats(kept=self.meta["stats"]["kept"])
        self.stats.dropped.update(self.meta["stats"]["dropped"])
        self._buckets: Buckets | None = None

    @property
    def buckets(self) -> Buckets:
        """The padded lengths fitted to this corpus (`Buckets.fit` with its defaults), which
        `batch` uses unless told otherwise and a default `TokenBatchSampler` computes alike."""
        if self._buckets is None:
            self._buckets = Buckets.fit(self.src_lengths, self.tgt_lengths)
        return self._buckets

    @classmethod
    def build(
        cls,
        src_path: str | Path,
        tgt_path: str | Path,
        tokenizer: Tokenizer,
        cache_dir: str | Path,
        max_tokens: int = 0,
        max_length_ratio: float = 0.0,
    ) -> EncodedCorpus:
        """Encodes a file pair once into `cache_dir` and opens it; later calls reuse the cache.

        The cache key covers the content of both files, the SentencePiece model bytes and the
        filter settings, so changing any of them builds a new cache. Pairs are read, encoded and
        written in chunks, so memory stays flat however large the corpus.

        Args:
            max_tokens: pairs with more subwords than this on either side are dropped; 0 keeps all.
            max_length_ratio: pairs whose subword lengths differ by more than this factor are
                dropped; 0 keeps all. Empty pairs are always dropped. Drops are counted and logged.
        """
        src_path, tgt_path = require_file(src_path), require_file(tgt_path)
        key_fields = {
            "version": CACHE_VERSION,
            "src": file_digest(src_path),
            "tgt": file_digest(tgt_path),
            "tokenizer": tokenizer.fingerprint(),
            "max_tokens": max_tokens,
            "max_length_ratio": max_length_ratio,
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
        cache_dir = Path(cache_dir)
        final = cache_dir / f"{src_path.name}-{tgt_path.name}-{key}"
        if (final / META_FILE).is_file():
            corpus = cls(final)
            logger.info("reusing encoded corpus %s (%d pairs)", final, len(corpus))
            return corpus

        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            stats = _encode_to_arrow(
                src_path, tgt_path, tokenizer, tmp / DATA_FILE, max_tokens, max_length_ratio
            )
            log_filter_stats(stats, f"encoding {src_path} + {tgt_path}")
            if stats.kept == 0:
                raise CorpusError(
                    f"no pairs left in {src_path} + {tgt_path} after filtering: {stats.summary()}"
                )
            meta = {
                **key_fields,
                "src_path": str(src_path),
                "tgt_path": str(tgt_path),
                "num_examples": stats.kept,
                "stats": stats.to_dict(),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same cache first
                if not (final / META_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(final)

    def __len__(self) -> int:
        return len(self.src_lengths)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        row = self.dataset[int(index)]
        return row["src"], row["tgt"]

    def batch(
        self,
        indices: Sequence[int],
        pad_id: int,
        bos_id: int,
        eos_id: int,
        padding: Buckets | int | None = None,
    ) -> Batch:
        """The collated Batch of these examples, straight from the Arrow columns.

        Args:
            padding: how lengths are padded (see `collate`); None: this corpus's `buckets`.
        """
        table = self._arrow[list(map(int, indices))]
        src = table.column("src").combine_chunks()
        tgt = table.column("tgt").combine_chunks()
        return _collate_flat(
            src.flatten().to_numpy().astype(np.int64),
            np.diff(src.offsets.to_numpy()),
            tgt.flatten().to_numpy().astype(np.int64),
            np.diff(tgt.offsets.to_numpy()),
            np.asarray(indices, dtype=np.int64),
            pad_id, bos_id, eos_id, self.buckets if padding is None else as_buckets(padding),
        )  # fmt: skip

    def src_ids(self, n: int | None = None) -> list[list[int]]:
        """The source subword ids of the first n examples (all: None), as lists."""
        column = self.dataset.data.column("src")
        rows = column.slice(0, n) if n is not None else column
        return [list(map(int, ids)) for ids in rows.to_pylist()]

    def target_token_ids(self) -> np.ndarray:
        """The distinct token ids on the target side, ascending.

        Counted one Arrow chunk at a time, so memory stays flat however large the corpus.
        """
        seen = np.zeros(0, dtype=bool)
        for chunk in self.dataset.data.column("tgt").chunks:
            ids = chunk.flatten().to_numpy(zero_copy_only=False)
            if len(ids):
                found = np.bincount(ids, minlength=len(seen)) > 0
                found[: len(seen)] |= seen
                seen = found
        return np.flatnonzero(seen).astype(np.int64)

    def length_ratio(self, coverage: float = 0.999, b: float = 5.0) -> tuple[float, float]:
        """(a, b) such that a * |src| + b covers `coverage` of the target lengths (a rounded up)."""
        ratio = (self.tgt_lengths - b) / np.maximum(self.src_lengths, 1)
        a = float(np.quantile(ratio, coverage, method="higher"))
        return max(math.ceil(a * 100) / 100, 0.0), b

    def __repr__(self) -> str:
        return f"EncodedCorpus({self.path.name}, {len(self)} pairs)"


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    parts = [np.diff(chunk.offsets.to_numpy()) for chunk in column.chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _encode_to_arrow(
    src_path: Path,
    tgt_path: Path,
    tokenizer: Tokenizer,
    out_file: Path,
    max_tokens: int,
    max_length_ratio: float,
) -> FilterStats:
    """Streams the pair through the tokenizer in chunks into an Arrow stream file."""
    stats = FilterStats()
    pairs = read_parallel(src_path, tgt_path)
    first_line = 0
    with pa.OSFile(str(out_file), "wb") as sink, pa.ipc.new_stream(sink, _SCHEMA) as writer:
        while chunk := list(islice(pairs, ENCODE_CHUNK)):
            src_ids = tokenizer.encode_src([s for s, _ in chunk])
            tgt_ids = tokenizer.encode_tgt([t for _, t in chunk])
            src_len = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(chunk))
            tgt_len = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(chunk))
            codes = drop_codes(src_len, tgt_len, max_tokens, max_length_ratio)
            for code, count in zip(*np.unique(codes, return_counts=True), strict=True):
                if code:
                    stats.dropped[_REASONS[int(code)]] += int(count)
            keep = np.flatnonzero(codes == 0)
            stats.kept += len(keep)
            if len(keep):
                columns = [
                    pa.array([src_ids[i] for i in keep], type=pa.list_(pa.int32())),
                    pa.array([tgt_ids[i] for i in keep], type=pa.list_(pa.int32())),
                    pa.array(keep + first_line, type=pa.int64()),
                ]
                writer.write_batch(pa.record_batch(columns, schema=_SCHEMA))
            first_line += len(chunk)
    return stats


# ---------------------------------------------------------------------------------------------
# Sampler


class TokenBatchSampler:
    """Length-bucketed batches of example ids whose padded size stays within a token budget.

    Examples are grouped by padded target length and, inside a group, sorted by source length,
    so padding stays low. Every batch satisfies B x S <= batch_tokens and B x T <= batch_tokens,
    where S and T are the padded source and target-plus-BOS/EOS lengths (rounded up by `buckets`,
    as `collate` does). By default the buckets are fitted to these lengths (`Buckets.fit` with
    `max_buckets`), as `EncodedCorpus.buckets` is, so `corpus.batch` pads the way the sampler
    counts. Ties are broken and batches ordered at random from (seed, epoch), so an epoch is
    reproducible. Every example is in exactly one batch per epoch.

    With several ranks, each takes every world_size-th batch; the batch count is made divisible
    by world_size by splitting a few of the largest batches, so every rank gets the same number
    of batches (no rank waits for another in DDP) and the shards stay disjoint.

    Iteration resumes from `position` (batches already yielded this epoch on this rank); when an
    epoch is exhausted the sampler moves to the next epoch by itself. `set_epoch(e)` with a new
    epoch starts it from the beginning, with the current epoch it keeps a restored position.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        batch_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_to_multiple: int | None = None,
        buckets: Buckets | None = None,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        """Sorts the examples into buckets; batches are made per epoch, when first asked for.

        Args:
            pad_to_multiple: round padded lengths up to a multiple of this instead of fitting
                buckets (1: exact lengths).
            buckets: the padded lengths to use; default: fitted to these lengths.
            max_buckets: how many boundaries fitted buckets may have.
        """
        src = np.asarray(src_lengths, dtype=np.int64)
        tgt = np.asarray(tgt_lengths, dtype=np.int64)
        if src.shape != tgt.shape or src.ndim != 1:
            raise ValueError(f"length arrays differ: {src.shape} source vs {tgt.shape} target")
        if len(src) == 0:
            raise ValueError("cannot sample batches from an empty corpus")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        if pad_to_multiple is not None and buckets is not None:
            raise ValueError("give TokenBatchSampler either pad_to_multiple or buckets, not both")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(src) < world_size:
            raise ValueError(f"{len(src)} examples cannot be shared among {world_size} ranks")
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        if pad_to_multiple is not None and pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be positive, got {pad_to_multiple}")
        if buckets is None:
            fitted = pad_to_multiple is None
            buckets = (
                Buckets.fit(src, tgt, max_buckets) if fitted else as_buckets(pad_to_multiple or 1)
            )
        self.buckets = buckets
        self.epoch = 0
        self.position = 0
        self._src_padded = buckets.pad(src)  # (N,)
        self._tgt_padded = buckets.pad(tgt + 1)  # BOS/EOS + y
        self._src = src
        self._tgt = tgt + 1
        self._cache: tuple[int, list[np.ndarray]] | None = None
        too_big = int(((self._src_padded > batch_tokens) | (self._tgt_padded > batch_tokens)).sum())
        if too_big:
            logger.warning(
                "%d examples are longer than batch_tokens=%d; each goes in a batch of its own",
                too_big,
                batch_tokens,
            )

    # -- epochs -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch; a different one than now starts from its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def all_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every rank's batches of an epoch, in order (rank r takes positions r, r + W, ...)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._make_batches(epoch))
        return self._cache[1]

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of an epoch."""
        return self.all_batches(epoch)[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.all_batches()) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        for k in range(self.position, len(batches)):
            self.position = k + 1
            yield batches[k].tolist()
        self.epoch += 1
        self.position = 0

    # -- resuming ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_batches": len(self),
            "buckets": self.buckets.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores epoch and position; the corpus, seed, world size and buckets must be the same."""
        if state.get("buckets", self.buckets.fingerprint()) != self.buckets.fingerprint():
            raise ValueError(
                f"cannot resume: the saved sampler padded to other bucket lengths than this one "
                f"({self.buckets.boundaries}; did the corpus or max_buckets change?)"
            )
        for name in ("seed", "world_size"):
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise ValueError(
                    f"cannot resume: the saved sampler has {name}={state[name]}, "
                    f"this one {getattr(self, name)}"
                )
        self.epoch = int(state["epoch"])
        if state.get("num_batches", len(self)) != len(self):
            raise ValueError(
                f"cannot resume: the saved sampler had {state['num_batches']} batches per epoch, "
                f"this one has {len(self)} (did the corpus or batch_tokens change?)"
            )
        self.position = int(state["position"])

    # -- statistics ---------------------------------------------------------------------------

    def padding_stats(self, epoch: int | None = None) -> dict[str, float]:
        """Padding share of source, target and both, over all batches of an epoch."""
        batches = self.all_batches(epoch)
        idx = np.concatenate(batches)
        sizes = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        padded_s = int((sizes * np.maximum.reduceat(self._src_padded[idx], starts)).sum())
        padded_t = int((sizes * np.maximum.reduceat(self._tgt_padded[idx], starts)).sum())
        real_s, real_t = int(self._src[idx].sum()), int(self._tgt[idx].sum())
        return {
            "src": 1 - real_s / padded_s,
            "tgt": 1 - real_t / padded_t,
            "total": 1 - (real_s + real_t) / (padded_s + padded_t),
        }

    def padding_ratio(self) -> float:
        """Share of padding among all source and target positions of this epoch's batches."""
        return self.padding_stats()["total"]

    # -- building ---------------------------------------------------------------------------

    def _make_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self._src)
        tie = rng.permutation(n) if self.shuffle else np.arange(n)
        order = np.lexsort((tie, self._src, self._tgt_padded))  # by target bucket, then source
        sorted_t = self._tgt_padded[order]
        sorted_s = self._src_padded[order]
        ends = np.append(np.flatnonzero(np.diff(sorted_t)) + 1, n)  # where each bucket stops
        bucket_ends = np.repeat(ends, np.diff(ends, prepend=0))  # (N,) the end of i's bucket
        budget = self.batch_tokens
        batches: list[np.ndarray] = []
        i = 0
        while i < n:
            j = min(i + max(1, budget // int(sorted_t[i])), int(bucket_ends[i]))
            if (j - i) * int(sorted_s[j - 1]) > budget:  # sources sorted: the last is the longest
                j = i + max(1, budget // int(sorted_s[j - 1]))
            batches.append(order[i:j])
            i = j
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return _split_until_divisible(batches, self.world_size)


def _split_until_divisible(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Splits batches in two until their number is a multiple of world_size.

    The largest of the last (count mod world_size) batches are split, so every step of W ranks
    takes the examples that one process accumulating W batches per step takes: the same global
    batches whatever the world size. Only when those are too small are others split.
    """
    cut = len(batches) - len(batches) % world_size
    head, tail = list(batches[:cut]), list(batches[cut:])
    while tail and len(tail) < world_size:
        k = max(range(len(tail)), key=lambda b: len(tail[b]))
        if len(tail[k]) < 2:
            break
        half = len(tail[k]) // 2
        tail[k : k + 1] = [tail[k][:half], tail[k][half:]]
    batches = head + tail
    while len(batches) % world_size:
        k = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[k]) < 2:
            raise ValueError(f"too few examples to give {world_size} ranks equal batch counts")
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


def iterate_batches(
    corpus: EncodedCorpus,
    sampler: TokenBatchSampler,
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> Iterator[Batch]:
    """Batches of `corpus` in the sampler's order (resuming where the sampler stands)."""
    for indices in sampler:
        yield corpus.batch(indices, pad_id, bos_id, eos_id, sampler.buckets)
