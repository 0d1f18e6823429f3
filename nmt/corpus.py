"""Raw parallel text: file pairs, TSV, JSONL; validation, length filters, and the corpus folder layout.

A prepared corpus is a folder `data/<name>/` with line-aligned `{train,dev,test}.<lang>` files and a
small `manifest.json` (languages, pairs per split, where the text came from, filters applied).
Every reader streams, checks UTF-8 (naming the file and line of a bad byte) and never silently
truncates: two files with different line counts are an error that names both files and both counts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
MANIFEST = "manifest.json"


class CorpusError(ValueError):
    """Bad parallel text; the message names the file, the line and the counts involved."""


# ---------------------------------------------------------------------------------------------
# Reading


def require_file(path: str | Path) -> Path:
    """The path, if it is a file; otherwise a CorpusError that lists what its folder holds."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"file not found: {path}" + _folder_hint(path))
    return path


def read_lines(path: str | Path) -> Iterator[str]:
    """Yields the lines of a UTF-8 text file without their line ending.

    Lines end at "\\n" only (a stray "\\r" or U+2028 inside a line never splits it), so line
    numbers agree with `wc -l` and with the other side of a pair. A UTF-8 byte-order mark is skipped.

    Raises:
        CorpusError: the file is missing, or a line is not valid UTF-8 (file and line number named).
    """
    path = require_file(path)
    done = 0  # lines yielded so far
    rest = b""
    with path.open("rb") as f:  # binary: Python's text mode would also split at a lone "\r"
        while block := f.read(_BLOCK):
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                rest = block
                continue
            rest = block[cut + 1 :]
            lines = _decode_lines(path, block[:cut], done)
            done += len(lines)
            yield from lines
    if rest:
        yield from _decode_lines(path, rest, done)


_BLOCK = 1 << 22


def iter_lines(stream: IO[bytes], name: str | Path) -> Iterator[str]:
    """Yields the lines of a binary stream (stdin, a pipe) exactly as `read_lines` reads a file,
    each one as soon as it has arrived (`read_lines` reads large blocks, which suits files).

    Args:
        name: what to call the stream in errors, e.g. "<stdin>".
    Raises:
        CorpusError: a line is not valid UTF-8 (its number named).
    """
    for done, raw in enumerate(stream):  # a binary stream's lines end at b"\n" only
        yield _decode_lines(name, raw[:-1] if raw.endswith(b"\n") else raw, done)[0]


def _decode_lines(path: str | Path, block: bytes, done: int) -> list[str]:
    """Decodes complete lines (joined by "\\n", the last one without it) in one go."""
    try:
        lines = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        for number, raw in enumerate(block.split(b"\n"), start=done + 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path}: line {number} is not valid UTF-8 "
                    f"(byte 0x{raw[err.start]:02x} at byte offset {err.start})"
                ) from None
        raise  # pragma: no cover  (some line must have failed)
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if done == 0 and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines


def count_lines(path: str | Path) -> int:
    """Number of lines in a file, counting a last line without a newline."""
    count, last = 0, b"\n"
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[tuple[str, str]]:
    """Streams (source, target) line pairs from two line-aligned files.

    Raises:
        CorpusError: a file is missing or has invalid UTF-8 (file and line named), or the two files
            have different line counts (both files and both counts named; raised when the shorter
            file runs out, so a consumer writing atomically keeps nothing half-done).
    """
    src_path, tgt_path = require_file(src_path), require_file(tgt_path)
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    sentinel = object()
    while True:
        src = next(src_lines, sentinel)
        tgt = next(tgt_lines, sentinel)
        if src is sentinel and tgt is sentinel:
            return
        if src is sentinel or tgt is sentinel:
            raise CorpusError(
                f"line counts differ: {src_path} has {count_lines(src_path)} lines but "
                f"{tgt_path} has {count_lines(tgt_path)}; the files must be line-aligned"
            )
        yield src, tgt  # type: ignore[misc]


def require_pairs(src_path: str | Path, tgt_path: str | Path) -> None:
    """Checks that a file pair holds a pair with text on both sides, reading only up to the first.

    Raises:
        CorpusError: it holds none (both files and the line count named), or see `read_parallel`.
    """
    lines = 0
    for src, tgt in read_parallel(src_path, tgt_path):
        if src.strip() and tgt.strip():
            return
        lines += 1
    what = "are empty" if lines == 0 else f"have {lines} lines but none with text on both sides"
    raise CorpusError(f"no sentence pairs: {src_path} and {tgt_path} {what}")


def read_tsv(
    path: str | Path, src_col: int = 0, tgt_col: int = 1, columns: int | None = None
) -> Iterator[tuple[str, str]]:
    """Streams pairs from a tab-separated file (no quoting; columns counted from 0).

    Every line must have exactly `columns` columns, so a tab inside a sentence is an error rather
    than a silently cut sentence.

    Args:
        columns: the number of columns of every line; default: max(src_col, tgt_col) + 1.
    Raises:
        CorpusError: invalid UTF-8, or a line with another number of columns (file, line and
            count named).
    """
    need = max(src_col, tgt_col) + 1 if columns is None else columns
    if need <= max(src_col, tgt_col):
        raise CorpusError(f"{path}: columns={columns} leaves no column {max(src_col, tgt_col)}")
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            yield "", ""  # keep the line so that filters count it as empty
            continue
        cols = line.split("\t")
        if len(cols) != need:
            hint = "; a tab inside a sentence cannot be told from a separator"
            raise CorpusError(
                f"{path}: line {number} has {len(cols)} tab-separated column(s), "
                f"expected {need}{hint if len(cols) > need else ''}"
            )
        yield cols[src_col], cols[tgt_col]


def read_jsonl(
    path: str | Path, src_lang: str | None = None, tgt_lang: str | None = None
) -> Iterator[tuple[str, str]]:
    """Streams pairs from JSON lines: `{"src": ..., "tgt": ...}`, `{"translation": {lang: ...}}`
    (the Hugging Face schema) or `{lang: ...}`; the last two need `src_lang` and `tgt_lang`.

    Raises:
        CorpusError: invalid UTF-8 or JSON, JSON nested too deeply or with a number too long to
            read, or a record without the wanted fields or whose fields are not text (file,
            line, field and the keys that do exist named).
    """
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            yield "", ""
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        except RecursionError:
            raise CorpusError(f"{path}: line {number} is JSON nested too deeply") from None
        except ValueError as err:  # an integer of more digits than Python converts
            reason = str(err).split(";")[0]
            raise CorpusError(f"{path}: line {number} cannot be read as JSON ({reason})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}: line {number} is not a JSON object")
        yield _pair_from_record(record, src_lang, tgt_lang, f"{path}: line {number}")


def _pair_from_record(
    record: dict[str, Any], src_lang: str | None, tgt_lang: str | None, where: str
) -> tuple[str, str]:
    if "src" in record and "tgt" in record:
        return as_text(record["src"], f"{where}, field 'src'"), as_text(
            record["tgt"], f"{where}, field 'tgt'"
        )
    nested = "translation" in record
    inner = record.get("translation", record)
    if not isinstance(inner, dict):
        raise CorpusError(f"{where}: 'translation' is not an object")
    if src_lang is None or tgt_lang is None:
        raise CorpusError(
            f"{where}: no 'src'/'tgt' fields; give the source and target languages to read "
            f"{sorted(inner)}"
        )
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in inner]
    if missing:
        raise CorpusError(
            f"{where}: no language {', '.join(map(repr, missing))}; this record has {sorted(inner)}"
        )
    prefix = "translation." if nested else ""
    return as_text(inner[src_lang], f"{where}, field '{prefix}{src_lang}'"), as_text(
        inner[tgt_lang], f"{where}, field '{prefix}{tgt_lang}'"
    )


def as_text(value: Any, where: str) -> str:
    """A sentence read from structured data (JSON, a dataset column): a missing value (None) is
    empty text; anything but a string, or a string that is not Unicode text (an unpaired
    surrogate, which JSON can write as an escape like "\\ud800"), is an error naming `where`.

    Raises:
        CorpusError: the value is not text; the message starts with `where`.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"{where}: expected a string, got {type(value).__name__} {value!r:.40}")
    surrogate = _SURROGATE.search(value)
    if surrogate is not None:
        raise CorpusError(
            f"{where}: unpaired surrogate U+{ord(surrogate.group()):04X} at character "
            f"{surrogate.start()}; the text is not valid Unicode"
        )
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------
# Filters and hold-out


def one_line(text: str) -> str:
    """The text with any line break (including U+2028, NEL, CR) turned into a space."""
    return _LINE_BREAKS.sub(" ", text)


_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_SPACES = re.compile(r"[\s\u200b\ufeff]+")


def normalize_text(text: str) -> str:
    """NFC-normalises the text and collapses every run of whitespace to one space, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


@dataclass
class FilterStats:
    """What a filter kept and, per reason, what it dropped."""

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """One line, e.g. `kept 980 pairs, dropped 20 (empty: 15, too_long: 5)`."""
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items()) if n)
        return f"kept {self.kept} pairs, dropped {self.total_dropped}" + (
            f" ({reasons})" if reasons else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def drop_reason(src_len: int, tgt_len: int, max_len: int = 0, max_ratio: float = 0.0) -> str | None:
    """Why a pair with these lengths is dropped ("empty", "too_long", "length_ratio"), or None.

    Args:
        max_len: longest allowed side; 0 disables the check.
        max_ratio: largest allowed longer/shorter length ratio; 0 disables the check.
    """
    if src_len == 0 or tgt_len == 0:
        return "empty"
    if max_len and max(src_len, tgt_len) > max_len:
        return "too_long"
    if max_ratio and max(src_len, tgt_len) > max_ratio * min(src_len, tgt_len):
        return "length_ratio"
    return None


def clean_pair(
    src: str,
    tgt: str,
    max_chars: int = 0,
    max_length_ratio: float = 0.0,
    normalize: bool = True,
) -> tuple[tuple[str, str], str | None]:
    """The pair, normalised, and the reason to drop it (see `drop_reason`) or None to keep it.

    Lengths are in characters (meaningful for languages written without spaces too).

    Args:
        max_chars: longest side allowed, in characters; 0 disables the check.
        max_length_ratio: largest longer/shorter character ratio; 0 disables the check.
        normalize: NFC-normalise and collapse whitespace (see `normalize_text`); otherwise only
            line breaks become spaces and the ends are stripped.
    """
    if normalize:
        src, tgt = normalize_text(src), normalize_text(tgt)
    else:
        src, tgt = one_line(src).strip(), one_line(tgt).strip()
    return (src, tgt), drop_reason(len(src), len(tgt), max_chars, max_length_ratio)


def filter_pairs(
    pairs: Iterable[tuple[str, str]],
    stats: FilterStats,
    max_chars: int = 0,
    max_length_ratio: float = 0.0,
    normalize: bool = True,
) -> Iterator[tuple[str, str]]:
    """Drops empty, over-long and badly length-mismatched pairs, counting each reason in `stats`.

    Arguments as for `clean_pair`; the kept pairs come out normalised.
    """
    for src, tgt in pairs:
        pair, reason = clean_pair(src, tgt, max_chars, max_length_ratio, normalize)
        if reason is None:
            stats.kept += 1
            yield pair
        else:
            stats.dropped[reason] += 1


def choose_holdout(total: int, dev_size: int, test_size: int, seed: int = 1234) -> dict[int, str]:
    """Picks, reproducibly from `seed`, which of `total` pairs go to dev and which to test.

    Returns {pair index: "dev" or "test"}; every other pair stays in train.

    Raises:
        CorpusError: a negative size, or a hold-out that would leave no training pairs.
    """
    if dev_size < 0 or test_size < 0:
        raise CorpusError(f"hold-out sizes must be >= 0, got dev={dev_size} test={test_size}")
    if dev_size + test_size >= total:
        raise CorpusError(
            f"cannot hold out {dev_size} dev + {test_size} test pairs from {total} pairs"
        )
    chosen = random.Random(seed).sample(range(total), dev_size + test_size)
    return {i: ("dev" if k < dev_size else "test") for k, i in enumerate(chosen)}


def log_filter_stats(stats: FilterStats, what: str) -> None:
    """Logs a filter's summary (a warning when it dropped anything)."""
    level = logging.WARNING if stats.total_dropped else logging.INFO
    logger.log(level, "%s: %s", what, stats.summary())


# ---------------------------------------------------------------------------------------------
# Corpus folders


def _folder_hint(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return f" (folder {folder} does not exist)"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f" ({folder} has: {shown or 'no files'})"


_NOT_LANGUAGES = {"json", "jsonl", "tsv", "txt", "md", "yaml", "yml", "model", "vocab", "arrow"}


def list_languages(corpus_dir: str | Path) -> dict[str, list[str]]:
    """The languages present per split in a corpus folder: {"train": ["en", "es"], ...}."""
    found: dict[str, list[str]] = {}
    for path in sorted(Path(corpus_dir).glob("*.*")):
        split, _, lang = path.name.partition(".")
        if path.is_file() and lang and "." not in lang and lang not in _NOT_LANGUAGES:
            found.setdefault(split, []).append(lang)
    return found


def split_files(
    corpus_dir: str | Path, split: str, src_lang: str, tgt_lang: str
) -> tuple[Path, Path]:
    """The (source, target) files of one split of a prepared corpus: `<dir>/<split>.<lang>`.

    Raises:
        CorpusError: the folder, the split or a language is missing; the message lists what exists.
    """
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        parent = corpus_dir.parent
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        hint = f"; {parent} has: {', '.join(siblings)}" if siblings else ""
        raise CorpusError(f"corpus folder not found: {corpus_dir}{hint}")
    languages = list_languages(corpus_dir)
    if split not in languages:
        have = ", ".join(f"{s} ({'/'.join(ls)})" for s, ls in languages.items()) or "no split files"
        raise CorpusError(f"{corpus_dir} has no '{split}' split; it has: {have}")
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in languages[split]]
    if missing:
        raise CorpusError(
            f"{corpus_dir}: no {split} file for language {', '.join(map(repr, missing))}; "
            f"{split} has languages: {', '.join(languages[split])}"
        )
    return corpus_dir / f"{split}.{src_lang}", corpus_dir / f"{split}.{tgt_lang}"


def read_manifest(corpus_dir: str | Path) -> dict[str, Any] | None:
    """The corpus folder's manifest.json, or None when it has none."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


class CorpusWriter:
    """Streams pairs into `<split>.<lang>` files of a corpus folder, then writes `manifest.json`.

    Files are written under temporary names and renamed by `close`, so an error (or `abort`)
    leaves no half-written corpus behind. Line breaks inside a sentence become spaces, so
    alignment cannot break. Use as a context manager: an exception aborts.
    """

    def __init__(self, out_dir: str | Path, src_lang: str, tgt_lang: str) -> None:
        if src_lang == tgt_lang:
            raise CorpusError(f"source and target language are both {src_lang!r}")
        self.out_dir = Path(out_dir)
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.counts: dict[str, int] = {}
        self._files: dict[str, tuple[Any, Any]] = {}
        self._renames: list[tuple[Path, Path]] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add_split(self, split: str) -> None:
        """Creates a split's files (a split nothing is written to stays empty)."""
        if split in self._files:
            return
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise CorpusError(f"invalid split name {split!r}")
        handles = []
        for lang in (self.src_lang, self.tgt_lang):
            final = self.out_dir / f"{split}.{lang}"
            tmp = _tmp_name(final)
            self._renames.append((tmp, final))
            handles.append(tmp.open("w", encoding="utf-8", newline="\n"))
        self._files[split] = (handles[0], handles[1])
        self.counts[split] = 0

    def write(self, split: str, src: str, tgt: str) -> None:
        """Appends one pair to a split (created on first use)."""
        self.add_split(split)
        fs, ft = self._files[split]
        fs.write(one_line(src) + "\n")
        ft.write(one_line(tgt) + "\n")
        self.counts[split] += 1

    def close(
        self,
        source: str,
        filters: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Renames the files into place and writes the manifest; returns it."""
        self._close_handles()
        for tmp, final in self._renames:
            os.replace(tmp, final)
        self._renames = []
        manifest: dict[str, Any] = {
            "name": self.out_dir.name,
            "languages": [self.src_lang, self.tgt_lang],
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "splits": dict(self.counts),
            "source": source,
            "filters": dict(filters or {}),
            **dict(extra or {}),
        }
        (self.out_dir / MANIFEST).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return manifest

    def abort(self) -> None:
        """Removes everything written so far."""
        self._close_handles()
        for tmp, _ in self._renames:
            tmp.unlink(missing_ok=True)
        self._renames = []

    def _close_handles(self) -> None:
        for fs, ft in self._files.values():
            fs.close()
            ft.close()
        self._files = {}

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self._renames:
            self.abort()  # an error, or close() was never called


def write_corpus(
    out_dir: str | Path,
    splits: Mapping[str, Iterable[tuple[str, str]]],
    src_lang: str,
    tgt_lang: str,
    source: str,
    filters: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes line-aligned `<split>.<lang>` files and `manifest.json`; returns the manifest.

    Pairs stream straight to disk (an iterable per split is enough); see `CorpusWriter`.

    Args:
        splits: split name -> (source, target) pairs, usually "train", "dev", "test".
        source: where the text came from, in words (kept in the manifest).
        filters: the filters applied and what they dropped (kept in the manifest).
        extra: further manifest fields.
    """
    with CorpusWriter(out_dir, src_lang, tgt_lang) as writer:
        for split, pairs in splits.items():
            writer.add_split(split)
            for src, tgt in pairs:
                writer.write(split, src, tgt)
        return writer.close(source, filters, extra)


def prepare_corpus(
    out_dir: str | Path,
    src_lang: str,
    tgt_lang: str,
    train: Iterable[tuple[str, str]],
    given: Mapping[str, Iterable[tuple[str, str]]],
    source: str,
    holdout: Mapping[int, str] | None = None,
    max_chars: int = 0,
    max_length_ratio: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, FilterStats]]:
    """Writes a corpus folder from training pairs (some held out for dev/test) and given splits.

    Training pairs and those held out of them go through the filters (`clean_pair`); given
    splits (an official dev or test set) are kept whole, with whitespace normalised only.

    Args:
        train: the training pairs, streamed once.
        given: further splits as they are, e.g. {"dev": ..., "test": ...}.
        holdout: {index of a training pair: split} for pairs to move out of train
            (see `choose_holdout`).
    Returns:
        The manifest and, per split, what the filters kept and dropped.
    Raises:
        CorpusError: bad input (see the readers), or no training pair passed the filters (then
            nothing is written).
    """
    holdout = holdout or {}
    clash = set(holdout.values()) & set(given)
    if clash:
        raise CorpusError(f"split(s) {', '.join(sorted(clash))} both given and held out of train")
    stats = {name: FilterStats() for name in ["train", *sorted(set(holdout.values())), *given]}
    with CorpusWriter(out_dir, src_lang, tgt_lang) as writer:
        for split in stats:
            writer.add_split(split)
        for i, (src, tgt) in enumerate(train):
            split = holdout.get(i, "train")
            pair, reason = clean_pair(src, tgt, max_chars, max_length_ratio)
            if reason is None:
                writer.write(split, *pair)
                stats[split].kept += 1
            else:
                stats[split].dropped[reason] += 1
        for split, pairs in given.items():
            for src, tgt in pairs:
                writer.write(split, normalize_text(src), normalize_text(tgt))
                stats[split].kept += 1
        filters = {
            "applied_to": "train and the pairs held out of it; given splits are kept whole",
            "max_chars": max_chars,
            "max_length_ratio": max_length_ratio,
            "dropped": {k: dict(v.dropped) for k, v in stats.items() if v.dropped},
        }
        if stats["train"].kept == 0:  # raised inside the writer, so nothing is kept on disk
            raise CorpusError(
                f"no training pairs for {out_dir} from {source}: {stats['train'].summary()}; "
                "nothing written"
            )
        manifest = writer.close(source, filters, extra)
    for split, split_stats in stats.items():
        log_filter_stats(split_stats, f"{out_dir}: {split}")
        if split_stats.kept == 0:
            logger.warning("%s: the %s split is empty", out_dir, split)
    return manifest, stats


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
