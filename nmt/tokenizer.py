"""SentencePiece subwords: training on the training split, encoding, decoding; the special ids live here."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from nmt.config import TokenizerConfig
from nmt.corpus import read_parallel

logger = logging.getLogger(__name__)

# The one definition of the special ids; everything else asks the tokenizer.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

JOINT_MODEL = "spm.model"
SRC_MODEL = "spm.src.model"
TGT_MODEL = "spm.tgt.model"


class TokenizerError(ValueError):
    """A SentencePiece model is missing, unreadable or uses other special ids."""


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


class Tokenizer:
    """Source and target SentencePiece models: one shared model (joint) or one per side."""

    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self, src_file: str | Path, tgt_file: str | Path | None = None) -> None:
        """Loads SentencePiece model files; without `tgt_file` the one model serves both sides."""
        self._src_file = Path(src_file)
        self._tgt_file = Path(tgt_file) if tgt_file is not None else None
        self._src = _load_model(self._src_file)
        self._tgt = _load_model(self._tgt_file) if self._tgt_file is not None else self._src
        self.num_threads = default_threads()

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        src_path: str | Path,
        tgt_path: str | Path,
        out_dir: str | Path,
        cfg: TokenizerConfig,
        num_threads: int = 0,
    ) -> Tokenizer:
        """Trains SentencePiece on a training file pair and writes the model(s) into `out_dir`.

        Joint: one model on both sides (`spm.model`); otherwise `spm.src.model` and
        `spm.tgt.model`, each with `cfg.vocab_size` pieces. The vocabulary size is a soft limit,
        so a tiny corpus yields a smaller vocabulary instead of an error. The files are read
        through `read_parallel`, so misaligned files or bad UTF-8 fail before any training.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        threads = num_threads or default_threads()
        if cfg.joint:
            path = out_dir / JOINT_MODEL
            _train_model(_sentences(src_path, tgt_path, sides=(0, 1)), path, cfg, threads)
            tok = cls(path)
        else:
            src_file, tgt_file = out_dir / SRC_MODEL, out_dir / TGT_MODEL
            _train_model(_sentences(src_path, tgt_path, sides=(0,)), src_file, cfg, threads)
            _train_model(_sentences(src_path, tgt_path, sides=(1,)), tgt_file, cfg, threads)
            tok = cls(src_file, tgt_file)
        logger.info(
            "trained SentencePiece %s (%s): %d source / %d target pieces",
            cfg.model_type,
            "joint" if cfg.joint else "separate",
            tok.src_vocab_size,
            tok.tgt_vocab_size,
        )
        return tok

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        """Loads `spm.model` (joint) or `spm.src.model` + `spm.tgt.model` from a folder."""
        model_dir = Path(model_dir)
        if (model_dir / JOINT_MODEL).is_file():
            return cls(model_dir / JOINT_MODEL)
        if (model_dir / SRC_MODEL).is_file() and (model_dir / TGT_MODEL).is_file():
            return cls(model_dir / SRC_MODEL, model_dir / TGT_MODEL)
        have = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else None
        raise TokenizerError(
            f"no SentencePiece model in {model_dir}: expected {JOINT_MODEL} or "
            f"{SRC_MODEL} + {TGT_MODEL}; "
            + (
                f"the folder has: {', '.join(have) or 'nothing'}"
                if have is not None
                else "no such folder"
            )
        )

    def save(self, model_dir: str | Path) -> list[Path]:
        """Copies the model file(s) into `model_dir` (under the standard names); returns them."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        if self.joint:
            pairs = [(self._src_file, model_dir / JOINT_MODEL)]
        else:
            assert self._tgt_file is not None
            pairs = [
                (self._src_file, model_dir / SRC_MODEL),
                (self._tgt_file, model_dir / TGT_MODEL),
            ]
        for source, dest in pairs:
            if source.resolve() != dest.resolve():
                shutil.copyfile(source, dest)
        return [dest for _, dest in pairs]

    # -- properties ---------------------------------------------------------------------------

    @property
    def joint(self) -> bool:
        return self._tgt_file is None

    @property
    def files(self) -> list[Path]:
        """The SentencePiece model file(s) this tokenizer was loaded from."""
        return [self._src_file] if self._tgt_file is None else [self._src_file, self._tgt_file]

    @property
    def src_vocab_size(self) -> int:
        return int(self._src.get_piece_size())

    @property
    def tgt_vocab_size(self) -> int:
        return int(self._tgt.get_piece_size())

    def fingerprint(self) -> str:
        """A hash of the model bytes (and layout): changes whenever encoding could change."""
        h = hashlib.sha256(b"joint" if self.joint else b"separate")
        for path in self.files:
            h.update(path.read_bytes())
        return h.hexdigest()

    # -- encoding -----------------------------------------------------------------------------

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Subword ids of source sentences, without BOS/EOS."""
        return self._src.encode(texts, out_type=int, num_threads=self.num_threads)  # type: ignore[no-any-return]

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Subword ids of target sentences, without BOS/EOS."""
        return self._tgt.encode(texts, out_type=int, num_threads=self.num_threads)  # type: ignore[no-any-return]

    def decode_src(self, ids: list[list[int]]) -> list[str]:
        """Detokenised source text; special ids (pad, BOS, EOS) are skipped."""
        return self._src.decode([list(map(int, x)) for x in ids])  # type: ignore[no-any-return]

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        """Detokenised target text; special ids (pad, BOS, EOS) are skipped."""
        return self._tgt.decode([list(map(int, x)) for x in ids])  # type: ignore[no-any-return]

    def src_pieces(self, ids: list[int]) -> list[str]:
        """The subword strings of source ids (for attention plots)."""
        return [self._src.id_to_piece(int(i)) for i in ids]

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        """The subword strings of target ids (for attention plots)."""
        return [self._tgt.id_to_piece(int(i)) for i in ids]

    def __repr__(self) -> str:
        kind = "joint" if self.joint else "separate"
        return (
            f"Tokenizer({kind}, src_vocab={self.src_vocab_size}, tgt_vocab={self.tgt_vocab_size})"
        )


def _load_model(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise TokenizerError(f"SentencePiece model not found: {path}")
    model = spm.SentencePieceProcessor()
    try:
        model.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"cannot read SentencePiece model {path}: {err}") from None
    ids = (model.pad_id(), model.unk_id(), model.bos_id(), model.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise TokenizerError(
            f"{path} uses special ids pad/unk/bos/eos = {ids}; this toolkit needs "
            f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (train it with Tokenizer.train)"
        )
    return model


def _sentences(src_path: str | Path, tgt_path: str | Path, sides: tuple[int, ...]) -> Iterator[str]:
    """Non-empty sentences of the chosen sides, source and target interleaved."""
    for pair in read_parallel(src_path, tgt_path):
        for side in sides:
            if pair[side].strip():
                yield pair[side]


def _train_model(
    sentences: Iterator[str], path: Path, cfg: TokenizerConfig, num_threads: int
) -> None:
    """Trains one SentencePiece model, quietly, and writes it to `path` atomically."""
    buffer = io.BytesIO()
    guarded = _Guarded(sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded,
            model_writer=buffer,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary, not an error
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            minloglevel=2,
        )
    except RuntimeError:
        if guarded.error is None:
            raise
        raise guarded.error from None  # an error while reading the corpus, not a SentencePiece one
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


class _Guarded:
    """Wraps a sentence iterator so that an error raised while reading reaches the caller intact
    (SentencePiece would turn it into a RuntimeError)."""

    def __init__(self, sentences: Iterator[str]) -> None:
        self._sentences = sentences
        self.error: Exception | None = None

    def __iter__(self) -> _Guarded:
        return self

    def __next__(self) -> str:
        try:
            return next(self._sentences)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err  # SentencePiece stops at once and raises a RuntimeError
            raise
