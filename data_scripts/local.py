"""Local parallel text -> a corpus folder `data/<name>/{train,dev,test}.<lang>` with a manifest.

Each split comes from a pair of line-aligned files, one TSV file (source<TAB>target) or one JSONL
file (`{"src": ..., "tgt": ...}` or `{"translation": {"de": ..., "en": ...}}`). Dev and test sets
can also be held out from the training data at random.

    python data_scripts/local.py --src de --tgt en --out data/my-de-en \\
        --train corpus.de corpus.en [--dev dev.de dev.en | --dev-size 2000] [--test-size 2000]
    python data_scripts/local.py --src de --tgt en --out data/x --train pairs.tsv --dev-size 500
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nmt.corpus import (
    CorpusError,
    FilterStats,
    choose_holdout,
    prepare_corpus,
    read_jsonl,
    read_parallel,
    read_tsv,
    require_file,
)


def detect_format(paths: list[str]) -> str:
    """`pair` for two files; `tsv` or `jsonl` from the extension of a single one."""
    if len(paths) == 2:
        return "pair"
    if len(paths) != 1:
        raise CorpusError(f"give one file (TSV or JSONL) or two line-aligned files, got {paths}")
    suffix = Path(paths[0]).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".tsv", ".tab", ".txt"):
        return "tsv"
    raise CorpusError(
        f"cannot tell the format of {paths[0]} from its extension; "
        "use .tsv or .jsonl, or give two line-aligned files"
    )


def read_pairs(paths: list[str], src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    """Streams the pairs of one split, whatever its format (see `detect_format`)."""
    fmt = detect_format(paths)
    if fmt == "pair":
        return read_parallel(paths[0], paths[1])
    if fmt == "tsv":
        return read_tsv(paths[0])
    return read_jsonl(paths[0], src_lang, tgt_lang)


def count_pairs(paths: list[str], src_lang: str, tgt_lang: str) -> int:
    """Number of pairs (validating the whole input on the way)."""
    return sum(1 for _ in read_pairs(paths, src_lang, tgt_lang))


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, FilterStats]]:
    """Writes the corpus folder; returns the manifest and the filter counts per split."""
    for paths in (args.train, args.dev, args.test):
        for path in paths or []:
            require_file(path)
    if args.dev and args.dev_size:
        raise CorpusError("give either --dev files or --dev-size, not both")
    if args.test and args.test_size:
        raise CorpusError("give either --test files or --test-size, not both")
    held: dict[int, str] = {}
    if args.dev_size or args.test_size:
        total = count_pairs(args.train, args.src, args.tgt)
        held = choose_holdout(total, args.dev_size, args.test_size, args.seed)
    given = {
        split: read_pairs(paths, args.src, args.tgt)
        for split, paths in (("dev", args.dev), ("test", args.test))
        if paths
    }
    inputs = {"train": args.train, "dev": args.dev, "test": args.test}
    return prepare_corpus(
        args.out,
        args.src,
        args.tgt,
        read_pairs(args.train, args.src, args.tgt),
        given,
        source="local files: " + "; ".join(f"{k}: {' + '.join(v)}" for k, v in inputs.items() if v),
        holdout=held,
        max_chars=args.max_chars,
        max_length_ratio=args.max_ratio,
        extra={"holdout": {"dev": args.dev_size, "test": args.test_size, "seed": args.seed}},
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="source language code, e.g. de")
    p.add_argument("--tgt", required=True, help="target language code, e.g. en")
    p.add_argument("--out", required=True, help="output folder, e.g. data/my-de-en")
    p.add_argument(
        "--train", nargs="+", required=True, metavar="FILE", help="2 files, a TSV or a JSONL"
    )
    p.add_argument("--dev", nargs="+", metavar="FILE", help="dev set: 2 files, a TSV or a JSONL")
    p.add_argument("--test", nargs="+", metavar="FILE", help="test set: 2 files, a TSV or a JSONL")
    p.add_argument("--dev-size", type=int, default=0, help="pairs held out of train for dev")
    p.add_argument("--test-size", type=int, default=0, help="pairs held out of train for test")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random hold-out")
    p.add_argument("--max-chars", type=int, default=1000, help="drop longer pairs (0: keep all)")
    p.add_argument(
        "--max-ratio",
        type=float,
        default=9.0,
        help="drop pairs whose lengths differ more (0: keep)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the filters report per split
    try:
        manifest, _ = prepare(args)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split} {n}" for split, n in manifest["splits"].items())
    print(f"wrote {args.out}: {counts} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
