"""A Hugging Face translation dataset -> a corpus folder `data/<name>/{train,dev,test}.<lang>`.

Works with any dataset in the translation schema `{"translation": {"de": ..., "en": ...}}`
(wmt14, iwslt2017, opus_books, ...) or with one column per language, from the Hub or from a
local path: a `save_to_disk` folder, a folder of data files, or a JSON lines / Parquet / CSV /
TSV file. Splits are renamed (validation -> dev); without a dev split, one is held out of train.

    python data_scripts/hf_dataset.py wmt14 --config de-en --src de --tgt en --out data/wmt14-de-en
    python data_scripts/hf_dataset.py opus_books --config en-es --src es --tgt en --out data/books
    python data_scripts/hf_dataset.py saved/ --src de --tgt en --out data/x
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nmt.corpus import CorpusError, as_text, choose_holdout, prepare_corpus

SPLIT_NAMES = {"train": "train", "validation": "dev", "valid": "dev", "dev": "dev", "test": "test"}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                  ".tsv": "csv", ".arrow": "arrow"}  # fmt: skip
HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Makes `datasets` use only its local cache (no network retries), for the block."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def offline_message(name: str) -> str:
    return (
        f"cannot load '{name}': the Hugging Face Hub is unreachable (no network, or blocked) "
        f"and '{name}' is not in the local datasets cache. Run this script where the Hub can be "
        "reached and copy the output folder here, or pass a local copy instead of a Hub name "
        "(a datasets.save_to_disk folder, or JSON lines / Parquet / TSV files), or prepare "
        "plain text files with data_scripts/local.py."
    )


def load_splits(
    name: str, config: str | None = None, cache_dir: str | None = None
) -> dict[str, Any]:
    """The dataset's splits {split name: datasets.Dataset}, from a local path or the Hub."""
    import datasets

    path = Path(name)
    try:
        if path.exists():
            with offline_mode():  # a local dataset never needs the network
                loaded = _load_local(path, config, cache_dir)
        elif os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            try:
                with offline_mode():
                    loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
            except (ConnectionError, OSError, ValueError) as err:
                raise CorpusError(offline_message(name)) from err
        else:
            loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except CorpusError:
        raise
    except (ConnectionError, OSError) as err:
        raise CorpusError(f"cannot load '{name}': {err}") from err
    except ValueError as err:  # e.g. a config name is required: the message lists them
        raise CorpusError(f"cannot load '{name}': {err}") from err
    except Exception as err:  # datasets fails on some empty inputs with IndexError, StopIteration
        raise CorpusError(
            f"cannot load '{name}' (empty or damaged?): {type(err).__name__} {err}"
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _load_local(path: Path, config: str | None, cache_dir: str | None) -> Any:
    import datasets

    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        if path.stat().st_size == 0:
            raise CorpusError(f"{path} is empty")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise CorpusError(
                f"{path}: unknown data file type; use one of {', '.join(sorted(LOCAL_BUILDERS))}"
            )
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(
            builder, data_files={"train": str(path)}, cache_dir=cache_dir, **options
        )
    return datasets.load_dataset(str(path), config, cache_dir=cache_dir)


def languages(dataset: Any) -> list[str]:
    """The languages a dataset holds: keys of its `translation` column, or its columns."""
    feature = dataset.features.get("translation")
    if feature is None:
        return list(dataset.column_names)
    if hasattr(feature, "languages"):  # datasets.Translation
        return list(feature.languages)
    return list(feature)  # a struct of strings, e.g. from JSON lines


def check_languages(dataset: Any, src: str, tgt: str, where: str) -> None:
    """Raises a CorpusError naming the languages present when `src` or `tgt` is missing."""
    have = languages(dataset)
    missing = [lang for lang in (src, tgt) if lang not in have]
    if missing:
        raise CorpusError(
            f"{where}: no language {', '.join(map(repr, missing))}; it has: {', '.join(have)}"
        )


def iter_pairs(
    dataset: Any, src: str, tgt: str, batch_size: int = 1000, where: str = "dataset"
) -> Iterator[tuple[str, str]]:
    """Streams (source, target) pairs of one split, a batch of rows at a time.

    Raises:
        CorpusError: a language is missing, or a value is not text (`where`, the row counted
            from 0 and the field named); a missing value (None) is read as empty text.
    """
    check_languages(dataset, src, tgt, where)
    nested = "translation" in dataset.column_names
    prefix = "translation." if nested else ""
    row = 0
    for batch in dataset.iter(batch_size=batch_size):
        if nested:
            pairs = [(r.get(src), r.get(tgt)) for r in batch["translation"]]
        else:
            pairs = list(zip(batch[src], batch[tgt], strict=True))
        for s, t in pairs:
            at = f"{where}, row {row}, field '{prefix}"
            yield as_text(s, f"{at}{src}'"), as_text(t, f"{at}{tgt}'")
            row += 1


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Writes the corpus folder; returns the manifest."""
    loaded = load_splits(args.name, args.config, args.cache_dir)
    splits: dict[str, Any] = {}
    where: dict[str, str] = {}  # our split name -> how errors name the dataset's split
    for name, dataset in loaded.items():
        ours = SPLIT_NAMES.get(name.lower(), re.sub(r"[^A-Za-z0-9_-]", "_", name))
        check_languages(dataset, args.src, args.tgt, f"'{args.name}' split {name}")
        if ours in splits:
            logging.warning("ignoring split %r: another split already became %r", name, ours)
            continue
        splits[ours] = dataset
        where[ours] = f"'{args.name}' split {name}"
    if "train" not in splits:
        raise CorpusError(f"'{args.name}' has no train split; it has: {', '.join(loaded)}")
    train = splits.pop("train")
    dev_size = 0 if "dev" in splits else min(args.dev_size, len(train) // 10)
    test_size = 0 if "test" in splits else args.test_size
    held = (
        choose_holdout(len(train), dev_size, test_size, args.seed) if dev_size or test_size else {}
    )
    if dev_size:
        logging.info("no dev split: holding out %d training pairs", dev_size)
    manifest, _ = prepare_corpus(
        args.out,
        args.src,
        args.tgt,
        iter_pairs(train, args.src, args.tgt, where=where["train"]),
        {
            name: iter_pairs(ds, args.src, args.tgt, where=where[name])
            for name, ds in splits.items()
        },
        source=f"Hugging Face dataset {args.name}" + (f" ({args.config})" if args.config else ""),
        holdout=held,
        max_chars=args.max_chars,
        max_length_ratio=args.max_ratio,
        extra={
            "hf_dataset": {
                "name": args.name,
                "config": args.config,
                "splits": {name: SPLIT_NAMES.get(name.lower(), name) for name in loaded},
                "held_out_of_train": {"dev": dev_size, "test": test_size, "seed": args.seed},
            }
        },
    )
    return manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="Hub dataset name (wmt14, opus_books, ...) or a local path")
    p.add_argument("--config", help="dataset configuration, e.g. de-en")
    p.add_argument("--src", required=True, help="source language code")
    p.add_argument("--tgt", required=True, help="target language code")
    p.add_argument("--out", required=True, help="output folder, e.g. data/wmt14-de-en")
    p.add_argument("--dev-size", type=int, default=2000,
                   help="pairs held out of train when there is no dev split (at most 10%%)")  # fmt: skip
    p.add_argument("--test-size", type=int, default=0,
                   help="pairs held out of train when there is no test split")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="seed of the random hold-out")
    p.add_argument(
        "--max-chars", type=int, default=1000, help="drop longer training pairs (0: keep)"
    )
    p.add_argument("--max-ratio", type=float, default=9.0,
                   help="drop training pairs whose lengths differ more than this factor (0: keep)")  # fmt: skip
    p.add_argument("--cache-dir", help="datasets cache folder (default: the datasets default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = export(args)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split} {n}" for split, n in manifest["splits"].items())
    print(f"wrote {args.out}: {counts} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
