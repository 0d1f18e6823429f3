"""The encoded-corpus cache, collation into batches, and the token-bounded bucket sampler."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import nmt.data
from nmt.config import TokenizerConfig
from nmt.corpus import CorpusError, drop_reason
from nmt.data import (
    Batch,
    Buckets,
    EncodedCorpus,
    TokenBatchSampler,
    collate,
    drop_codes,
    iterate_batches,
    optimal_boundaries,
)
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# -- collate ----------------------------------------------------------------------------------


def test_collate_builds_teacher_forcing_inputs() -> None:
    examples = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14])]
    batch = collate(examples, [4, 2], PAD_ID, BOS_ID, EOS_ID, padding=1)
    assert batch.src.tolist() == [[5, 6, 7], [10, PAD_ID, PAD_ID]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.src_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9, 0, 0], [BOS_ID, 11, 12, 13, 14]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS_ID, 0, 0], [11, 12, 13, 14, EOS_ID]]
    assert batch.indices.tolist() == [4, 2]
    assert batch.num_tgt_tokens == 3 + 5
    assert (
        batch.src.dtype == batch.tgt_in.dtype == torch.long and batch.src_mask.dtype == torch.bool
    )


def test_collate_rounds_padded_lengths_up() -> None:
    batch = collate([([5] * 9, [6] * 7)], [0], PAD_ID, BOS_ID, EOS_ID, padding=8)
    assert batch.src.shape == (1, 16) and batch.tgt_in.shape == (1, 8)  # 9 -> 16, 7 + 1 -> 8
    assert batch.src_mask.sum().item() == 9 and batch.num_tgt_tokens == 8
    assert [Buckets(multiple=m).pad_length(n) for n, m in [(17, 8), (16, 8), (5, 1)]] == [24, 16, 5]


def test_collate_pads_up_to_the_next_bucket_boundary() -> None:
    buckets = Buckets((4, 9, 12))
    batch = collate([([5] * 9, [6] * 2), ([5] * 3, [6] * 4)], [0, 1], PAD_ID, BOS_ID, EOS_ID,
                    padding=buckets)  # fmt: skip
    assert batch.src.shape == (2, 9) and batch.tgt_in.shape == (2, 9)  # 9 -> 9, 4 + 1 -> 9
    assert buckets.pad(np.array([1, 4, 5, 12, 13, 17])).tolist() == [4, 4, 9, 12, 16, 24]


def test_batch_to_keeps_lengths_on_the_cpu() -> None:
    batch = collate([([5], [6])], [0], PAD_ID, BOS_ID, EOS_ID)
    moved = batch.to("meta")
    assert moved.src.device.type == "meta" and moved.tgt_out.device.type == "meta"
    assert moved.src_lengths.device.type == "cpu" and moved.indices.device.type == "cpu"


# -- encoded corpus ---------------------------------------------------------------------------


@pytest.fixture
def train_pair(toy_corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the toy training files (tests below modify them)."""
    src, tgt = tmp_path / "train.es", tmp_path / "train.en"
    shutil.copyfile(toy_corpus / "train.es", src)
    shutil.copyfile(toy_corpus / "train.en", tgt)
    return src, tgt


def test_encoded_corpus_holds_the_tokenizer_ids(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    src_lines = train_pair[0].read_text("utf-8").splitlines()
    tgt_lines = train_pair[1].read_text("utf-8").splitlines()
    assert len(corpus) == len(src_lines) == 300
    assert corpus[7] == (toy_tokenizer.encode_src([src_lines[7]])[0],
                         toy_tokenizer.encode_tgt([tgt_lines[7]])[0])  # fmt: skip
    assert corpus.src_lengths.tolist() == [len(x) for x in toy_tokenizer.encode_src(src_lines)]
    assert corpus.tgt_lengths.tolist() == [len(x) for x in toy_tokenizer.encode_tgt(tgt_lines)]
    assert corpus.lines.tolist() == list(range(300))
    # the rows live in an Arrow file under the cache folder, memory-mapped by `datasets`
    assert all(
        Path(f["filename"]).is_relative_to(tmp_path / "cache") for f in corpus.dataset.cache_files
    )


def test_batches_from_arrow_equal_collate(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    indices = [5, 0, 299, 42]
    fast = corpus.batch(indices, PAD_ID, BOS_ID, EOS_ID)
    slow = collate([corpus[i] for i in indices], indices, PAD_ID, BOS_ID, EOS_ID, corpus.buckets)
    for name in ("src", "src_lengths", "src_mask", "tgt_in", "tgt_out", "indices"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.num_tgt_tokens == slow.num_tgt_tokens


def test_filters_drop_and_log_what_they_drop(
    tmp_path: Path, toy_tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "a.es"
    tgt = tmp_path / "a.en"
    src.write_text("El gato come pan.\n\nEl perro ve la luna hoy.\nSí.\nLa niña tiene agua.\n")
    tgt.write_text("The cat eats bread.\nEmpty source.\n" + "The dog sees the moon today. " * 5
                   + "\nThe girl has water and the man has bread and the dog has a house.\n"
                   "The girl has water.\n")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="nmt"):
        corpus = EncodedCorpus.build(
            src, tgt, toy_tokenizer, tmp_path / "cache", max_tokens=60, max_length_ratio=4.0
        )
    assert corpus.lines.tolist() == [0, 4]
    assert dict(corpus.stats.dropped) == {"empty": 1, "too_long": 1, "length_ratio": 1}
    assert "kept 2 pairs, dropped 3 (empty: 1, length_ratio: 1, too_long: 1)" in caplog.text


def test_vectorised_filter_agrees_with_drop_reason() -> None:
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, 30, 500), rng.integers(0, 30, 500)
    codes = drop_codes(src, tgt, max_tokens=20, max_length_ratio=2.5)
    names = {0: None, 1: "empty", 2: "too_long", 3: "length_ratio"}
    assert [names[int(c)] for c in codes] == [
        drop_reason(int(a), int(b), 20, 2.5) for a, b in zip(src, tgt, strict=True)
    ]


def test_second_build_reuses_the_cache(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    first = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache", 50, 3.0)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again")

    monkeypatch.setattr(nmt.data, "_encode_to_arrow", fail)
    second = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache", 50, 3.0)
    assert second.path == first.path and second[3] == first[3]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_changed_inputs_invalidate_the_cache(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, toy_corpus: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    base = EncodedCorpus.build(*train_pair, toy_tokenizer, cache)
    # same size and modification time, one letter changed: the content hash still notices
    src = train_pair[0]
    stat = src.stat()
    lines = src.read_text("utf-8").splitlines()
    k = next(i for i, line in enumerate(lines) if "gato" in line)
    lines[k] = lines[k].replace("gato", "pato")
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    edited = EncodedCorpus.build(*train_pair, toy_tokenizer, cache)
    assert edited.path != base.path
    assert edited[k][0] == toy_tokenizer.encode_src([lines[k]])[0] != base[k][0]

    other_tok = Tokenizer.train(
        toy_corpus / "train.es", toy_corpus / "train.en", tmp_path / "tok",
        TokenizerConfig(vocab_size=48, model_type="bpe"),
    )  # fmt: skip
    retokenised = EncodedCorpus.build(*train_pair, other_tok, cache)
    assert retokenised[k][0] == other_tok.encode_src([lines[k]])[0]
    median = int(np.median(base.src_lengths))
    refiltered = EncodedCorpus.build(*train_pair, toy_tokenizer, cache, max_tokens=median)
    assert len({base.path, edited.path, retokenised.path, refiltered.path}) == 4
    assert len(refiltered) < len(base)


def test_misaligned_files_fail_and_leave_no_cache(tmp_path: Path, toy_tokenizer: Tokenizer) -> None:
    (tmp_path / "a.es").write_text("uno\ndos\n")
    (tmp_path / "a.en").write_text("one\n")
    with pytest.raises(CorpusError, match="line counts differ"):
        EncodedCorpus.build(tmp_path / "a.es", tmp_path / "a.en", toy_tokenizer, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(CorpusError, match="file not found"):
        EncodedCorpus.build(tmp_path / "b.es", tmp_path / "a.en", toy_tokenizer, tmp_path / "cache")


def test_length_ratio_covers_the_training_targets(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    a, b = corpus.length_ratio(coverage=0.999)
    covered = corpus.tgt_lengths <= a * corpus.src_lengths + b
    assert covered.mean() >= 0.999
    a_half, _ = corpus.length_ratio(coverage=0.5)
    assert a_half <= a


# -- sampler ----------------------------------------------------------------------------------


def random_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 80, n)
    tgt = np.clip(src + rng.integers(-10, 10, n), 1, None)
    return src, tgt


def padded_tokens(
    batch: list[int], src: np.ndarray, tgt: np.ndarray, multiple: int
) -> tuple[int, int]:
    padding = Buckets(multiple=multiple)
    s = padding.pad_length(int(src[batch].max()))
    t = padding.pad_length(int(tgt[batch].max()) + 1)
    return len(batch) * s, len(batch) * t


@pytest.mark.parametrize("multiple", [1, 8])
def test_token_bound_is_never_exceeded(multiple: int) -> None:
    src, tgt = random_lengths(3000)
    sampler = TokenBatchSampler(src, tgt, batch_tokens=1024, seed=0, pad_to_multiple=multiple)
    for batch in sampler:
        s, t = padded_tokens(batch, src, tgt, multiple)
        assert s <= 1024 and t <= 1024


def test_every_example_exactly_once_per_epoch() -> None:
    src, tgt = random_lengths(2000)
    sampler = TokenBatchSampler(src, tgt, batch_tokens=700, seed=1)
    for _ in range(2):
        seen = [i for batch in sampler for i in batch]
        assert sorted(seen) == list(range(2000))


def test_same_seed_same_order_and_epochs_differ() -> None:
    src, tgt = random_lengths(1000)
    a = list(TokenBatchSampler(src, tgt, 500, seed=7))
    b = list(TokenBatchSampler(src, tgt, 500, seed=7))
    c = list(TokenBatchSampler(src, tgt, 500, seed=8))
    assert a == b and a != c
    sampler = TokenBatchSampler(src, tgt, 500, seed=7)
    first, second = list(sampler), list(sampler)  # the second pass is epoch 1
    assert first == a and second != first and sampler.epoch == 2
    sampler.set_epoch(1)
    assert list(sampler) == second


def test_resuming_mid_epoch_continues_the_same_order() -> None:
    src, tgt = random_lengths(1000)
    sampler = TokenBatchSampler(src, tgt, 500, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 4 and state["position"] == 5
    resumed = TokenBatchSampler(src, tgt, 500, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a training loop calling set_epoch for the same epoch keeps the position
    assert head + list(resumed) == full
    assert resumed.state_dict()["epoch"] == 5 and resumed.state_dict()["position"] == 0


def test_resume_refuses_a_different_setup() -> None:
    src, tgt = random_lengths(500)
    state = TokenBatchSampler(src, tgt, 500, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed=3"):
        TokenBatchSampler(src, tgt, 500, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batches per epoch"):
        TokenBatchSampler(src, tgt, 300, seed=3).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_are_disjoint_cover_everything_and_have_equal_length(world_size: int) -> None:
    src, tgt = random_lengths(1001)
    shards = [
        TokenBatchSampler(src, tgt, 600, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    batches = [list(s) for s in shards]
    assert len({len(b) for b in batches}) == 1
    assert all(len(b) == len(s) for b, s in zip(batches, shards, strict=True))
    seen = [i for shard in batches for batch in shard for i in batch]
    assert sorted(seen) == list(range(1001))


def test_shards_work_for_tiny_corpora() -> None:
    shards = [TokenBatchSampler([3, 4, 5], [3, 4, 5], 4096, rank=r, world_size=3) for r in range(3)]
    assert [list(s) for s in shards] and all(len(s) == 1 for s in shards)
    with pytest.raises(ValueError, match="cannot be shared among 4 ranks"):
        TokenBatchSampler([3, 4, 5], [3, 4, 5], 4096, world_size=4)


def test_length_buckets_keep_padding_low() -> None:
    src, tgt = random_lengths(5000)
    sampler = TokenBatchSampler(src, tgt, 2048, seed=0, pad_to_multiple=1)
    ratio = sampler.padding_ratio()
    assert 0 <= ratio < 0.1
    # against random batches of the same sizes
    rng = np.random.default_rng(0)
    order = rng.permutation(len(src))
    sizes = [len(b) for b in sampler]
    cuts = np.cumsum(sizes)[:-1]
    real = padded = 0
    for batch in np.split(order, cuts):
        s, t = padded_tokens(list(batch), src, tgt, 1)
        padded += s + t
        real += int(src[batch].sum() + tgt[batch].sum() + len(batch))
    assert ratio < (1 - real / padded) / 3
    assert sampler.padding_stats()["total"] == ratio


def test_an_overlong_example_gets_a_batch_of_its_own(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sampler = TokenBatchSampler([3, 300, 4, 5], [3, 290, 4, 5], batch_tokens=64)
    assert "1 examples are longer than batch_tokens=64" in caplog.text
    assert [1] in list(sampler)


def test_iterate_batches_over_the_toy_corpus(
    toy_corpus: Path, toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(
        toy_corpus / "train.es", toy_corpus / "train.en", toy_tokenizer, tmp_path / "cache"
    )
    sampler = TokenBatchSampler(corpus.src_lengths, corpus.tgt_lengths, 256, seed=0)
    batches: list[Batch] = list(iterate_batches(corpus, sampler, PAD_ID, BOS_ID, EOS_ID))
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b.indices.tolist()) == list(range(len(corpus)))
    for b in batches:
        assert b.src.numel() <= 256 and b.tgt_in.numel() <= 256
        assert b.src.size(1) in sampler.buckets.boundaries
        assert b.tgt_in.size(1) in sampler.buckets.boundaries
        assert torch.equal(b.src_mask, b.src != PAD_ID)
        assert b.num_tgt_tokens == int((b.tgt_out != PAD_ID).sum())


# -- buckets fitted to the length distribution -------------------------------------------------


def short_phrase_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of a corpus of short phrases: 3 to 10 subwords a side."""
    rng = np.random.default_rng(seed)
    src = rng.integers(3, 11, n)
    return src, np.clip(src + rng.integers(-2, 3, n), 3, 10)


def test_fitted_buckets_pad_short_phrases_far_less_than_multiples_of_8() -> None:
    src, tgt = short_phrase_lengths(20_000)
    fitted = TokenBatchSampler(src, tgt, 2048, seed=0).padding_ratio()
    rounded = TokenBatchSampler(src, tgt, 2048, seed=0, pad_to_multiple=8).padding_ratio()
    assert rounded > 0.2 and fitted < 0.02


@pytest.mark.parametrize("max_buckets", [1, 4, 16])
def test_fitted_buckets_bound_the_number_of_distinct_lengths(max_buckets: int) -> None:
    src, tgt = random_lengths(5000, seed=2)
    sampler = TokenBatchSampler(src, tgt, 2048, seed=0, max_buckets=max_buckets)
    boundaries = sampler.buckets.boundaries
    assert len(boundaries) <= max_buckets and boundaries[-1] == max(src.max(), tgt.max() + 1)
    widths = set()
    for batch in sampler:
        s = sampler.buckets.pad_length(int(src[batch].max()))
        t = sampler.buckets.pad_length(int(tgt[batch].max()) + 1)
        assert len(batch) * s <= 2048 and len(batch) * t <= 2048
        widths |= {s, t}
    assert widths <= set(boundaries)
    seen = sorted(i for batch in sampler for i in batch)  # the next epoch
    assert seen == list(range(5000))


def test_more_buckets_never_pad_more() -> None:
    src, tgt = random_lengths(5000, seed=3)
    pads = [TokenBatchSampler(src, tgt, 2048, max_buckets=k).padding_ratio() for k in (2, 8, 32)]
    assert pads[0] > pads[1] > pads[2]


def test_boundaries_minimise_rounding_padding() -> None:
    """Against every choice of boundaries on small histograms (the longest length is always one)."""
    rng = np.random.default_rng(0)

    def cost(hist: np.ndarray, bounds: list[int]) -> int:
        b = np.asarray(bounds)
        lengths = np.flatnonzero(hist)
        return int((hist[lengths] * (b[np.searchsorted(b, lengths)] - lengths)).sum())

    for _ in range(100):
        hist = rng.integers(0, 4, int(rng.integers(2, 12)))
        hist[-1] += 1
        k = int(rng.integers(1, 5))
        lengths = np.flatnonzero(hist).tolist()
        best = min(
            cost(hist, [*chosen, lengths[-1]])
            for r in range(min(k, len(lengths)))
            for chosen in itertools.combinations(lengths[:-1], r)
        )
        got = optimal_boundaries(hist, k)
        assert len(got) <= k and got[-1] == lengths[-1] and cost(hist, got) == best


def test_fitting_is_deterministic_and_the_corpus_fits_the_same_buckets(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    sampler = TokenBatchSampler(corpus.src_lengths, corpus.tgt_lengths, 256, seed=0)
    assert sampler.buckets == corpus.buckets == Buckets.fit(corpus.src_lengths, corpus.tgt_lengths)
    for indices in list(sampler)[:5]:  # the corpus's default padding is the sampler's
        batch = corpus.batch(indices, PAD_ID, BOS_ID, EOS_ID)
        assert batch.src.numel() <= 256 and batch.tgt_in.numel() <= 256


def test_resume_refuses_other_buckets() -> None:
    src, tgt = random_lengths(2000)
    state = TokenBatchSampler(src, tgt, 500, seed=3, max_buckets=8).state_dict()
    with pytest.raises(ValueError, match="bucket lengths"):
        TokenBatchSampler(src, tgt, 500, seed=3, max_buckets=12).load_state_dict(state)


def test_target_token_ids_are_the_distinct_target_ids(
    train_pair: tuple[Path, Path], toy_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    expected = sorted({i for k in range(len(corpus)) for i in corpus[k][1]})
    assert corpus.target_token_ids().tolist() == expected


def test_target_token_ids_go_one_chunk_at_a_time(
    train_pair: tuple[Path, Path],
    toy_tokenizer: Tokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory stays flat: never the whole target column at once (a large corpus has billions)."""
    monkeypatch.setattr(nmt.data, "ENCODE_CHUNK", 30)  # ten record batches
    corpus = EncodedCorpus.build(*train_pair, toy_tokenizer, tmp_path / "cache")
    column = corpus.dataset.data.column("tgt")
    assert column.num_chunks >= 10
    all_ids = column.combine_chunks().flatten().to_numpy()
    tracemalloc.start()
    ids = corpus.target_token_ids()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ids.tolist() == np.unique(all_ids).tolist()
    assert peak < all_ids.nbytes / 2  # sorting a copy of the whole column would take all of it


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_the_global_batches_of_one_process_accumulating_world_size_batches(
    world_size: int,
) -> None:
    src, tgt = random_lengths(1001, seed=4)
    single = list(TokenBatchSampler(src, tgt, 580, seed=5))  # 95 batches
    assert len(single) % world_size  # the ranks need a split
    shards = [
        list(TokenBatchSampler(src, tgt, 580, seed=5, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    for step, batches in enumerate(zip(*shards, strict=True)):
        accumulated = single[step * world_size : (step + 1) * world_size]
        assert sorted(i for b in batches for i in b) == sorted(i for b in accumulated for i in b)
