"""SentencePiece training, loading and encoding; the special ids."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import pytest
import sentencepiece as spm

from nmt.config import TokenizerConfig
from nmt.corpus import CorpusError
from nmt.tokenizer import (
    BOS_ID,
    EOS_ID,
    JOINT_MODEL,
    PAD_ID,
    SRC_MODEL,
    TGT_MODEL,
    UNK_ID,
    Tokenizer,
    TokenizerError,
)


def test_special_ids_are_fixed_and_on_the_tokenizer(toy_tokenizer: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    tok = toy_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert tok.tgt_pieces([PAD_ID, UNK_ID, BOS_ID, EOS_ID]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_joint_model_roundtrips_text(toy_tokenizer: Tokenizer) -> None:
    tok = toy_tokenizer
    assert tok.joint and tok.files[0].name == JOINT_MODEL
    assert tok.src_vocab_size == tok.tgt_vocab_size <= 64
    texts = ["El gato come pan hoy.", "The woman looks for a book."]
    ids = tok.encode_tgt(texts)
    assert all(BOS_ID not in x and EOS_ID not in x and PAD_ID not in x for x in ids)
    assert tok.decode_tgt(ids) == texts
    assert tok.decode_tgt([ids[0] + [EOS_ID, PAD_ID]]) == [texts[0]]  # specials are skipped
    assert "".join(tok.src_pieces(tok.encode_src(texts)[0])).replace("▁", " ").strip() == texts[0]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_separate_vocabularies(
    toy_corpus: Path, tmp_path: Path, model_type: Literal["unigram", "bpe"]
) -> None:
    cfg = TokenizerConfig(vocab_size=60, model_type=model_type, joint=False)
    tok = Tokenizer.train(toy_corpus / "train.es", toy_corpus / "train.en", tmp_path, cfg)
    assert not tok.joint
    assert [p.name for p in tok.files] == [SRC_MODEL, TGT_MODEL]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SRC_MODEL, TGT_MODEL]
    # each side only learnt its own language: "ñ" is Spanish only, "w" English only
    src_pieces = "".join(tok.src_pieces(list(range(tok.src_vocab_size))))
    tgt_pieces = "".join(tok.tgt_pieces(list(range(tok.tgt_vocab_size))))
    assert "ñ" in src_pieces and "w" not in src_pieces
    assert "w" in tgt_pieces and "ñ" not in tgt_pieces
    assert tok.decode_tgt(tok.encode_tgt(["The dog sees the moon."])) == ["The dog sees the moon."]


def test_vocabulary_larger_than_the_corpus_allows_is_not_an_error(
    toy_corpus: Path, tmp_path: Path
) -> None:
    cfg = TokenizerConfig(vocab_size=5000, model_type="bpe")
    tok = Tokenizer.train(toy_corpus / "train.es", toy_corpus / "train.en", tmp_path, cfg)
    assert 64 < tok.src_vocab_size < 5000


def test_save_and_load_give_the_same_tokenizer(toy_tokenizer: Tokenizer, tmp_path: Path) -> None:
    saved = toy_tokenizer.save(tmp_path / "model")
    assert saved == [tmp_path / "model" / JOINT_MODEL]
    loaded = Tokenizer.load(tmp_path / "model")
    text = ["Mi amigo tiene flores ahora."]
    assert loaded.encode_src(text) == toy_tokenizer.encode_src(text)
    assert loaded.fingerprint() == toy_tokenizer.fingerprint()
    assert loaded.save(tmp_path / "model") == saved  # saving onto itself is harmless


def test_load_explains_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("x: 1\n")
    with pytest.raises(
        TokenizerError, match=r"expected spm\.model or .* the folder has: config\.yaml"
    ):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no such folder"):
        Tokenizer.load(tmp_path / "missing")


def test_models_with_other_special_ids_are_rejected(toy_corpus: Path, tmp_path: Path) -> None:
    spm.SentencePieceTrainer.train(
        input=str(toy_corpus / "train.en"),
        model_prefix=str(tmp_path / "spm"),
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )  # SentencePiece's defaults: unk=0, bos=1, eos=2, no pad
    with pytest.raises(TokenizerError, match=r"uses special ids pad/unk/bos/eos = \(-1, 0, 1, 2\)"):
        Tokenizer.load(tmp_path)


def test_training_on_misaligned_files_raises_the_corpus_error(tmp_path: Path) -> None:
    (tmp_path / "a.es").write_text("uno\ndos\n")
    (tmp_path / "a.en").write_text("one\n")
    with pytest.raises(CorpusError, match="line counts differ"):
        Tokenizer.train(tmp_path / "a.es", tmp_path / "a.en", tmp_path / "tok", TokenizerConfig())
    assert not (tmp_path / "tok" / JOINT_MODEL).exists()


def test_fingerprint_follows_the_model_bytes(
    toy_tokenizer: Tokenizer, toy_corpus: Path, tmp_path: Path
) -> None:
    shutil.copytree(toy_tokenizer.files[0].parent, tmp_path / "copy")
    assert Tokenizer.load(tmp_path / "copy").fingerprint() == toy_tokenizer.fingerprint()
    other = Tokenizer.train(
        toy_corpus / "train.es", toy_corpus / "train.en", tmp_path / "other",
        TokenizerConfig(vocab_size=48, model_type="bpe"),
    )  # fmt: skip
    assert other.fingerprint() != toy_tokenizer.fingerprint()
