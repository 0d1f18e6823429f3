"""The output vocabulary: a softmax over the target side's tokens only, in the model, the loss,
saved weights, search and training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from search_helpers import call
from test_model import BOS, EOS, PAD, VOCAB, make_model, pad_batch
from test_search import TableModel, batch, random_table
from torch import Tensor

from nmt import checkpoint as ckpt
from nmt.loss import label_smoothed_nll
from nmt.model import Seq2Seq
from nmt.search import beam_search, greedy_search
from nmt.translate import Translator

UNK = 1
KEPT = [UNK, EOS, 4, 6, 7, 9, 12, 15]  # the "target side": a subset of the 16 ids


pytestmark = pytest.mark.usefixtures("one_thread")


def restricted_model(seed: int = 0, ids: list[int] = KEPT) -> Seq2Seq:
    torch.manual_seed(seed)
    model = make_model("lstm", "luong-general", "gnmt", input_feeding=True).eval()
    with torch.no_grad():
        model.out_bias.normal_()
    model.set_output_vocab(torch.tensor(ids), UNK)
    return model


def test_logits_are_the_full_vocabularys_columns_of_the_kept_tokens():
    model = restricted_model()
    src, lengths, mask = pad_batch([[4, 5, 6], [7, 8]])
    tgt_in = torch.tensor([[BOS, 4, 6], [BOS, 9, PAD]])
    restricted = model(src, lengths, mask, tgt_in)
    assert restricted.shape == (2, 3, len(KEPT)) and model.num_outputs == len(KEPT)
    model.set_output_vocab(None, UNK)
    full = model(src, lengths, mask, tgt_in)
    assert full.shape == (2, 3, VOCAB)
    torch.testing.assert_close(restricted, full[..., KEPT])
    # the step gives the same columns, with and without gradients (the cached rows)
    model.set_output_vocab(torch.tensor(KEPT), UNK)
    memory, state = model.encode(src, lengths, mask)
    with torch.no_grad():
        step_logits, _, _ = model.step(tgt_in[:, 0], state, memory)
        again, _, _ = model.step(tgt_in[:, 0], state, memory)
    torch.testing.assert_close(step_logits, restricted[:, 0])
    torch.testing.assert_close(again, step_logits)
    assert model.token_ids(torch.tensor([0, 2, 7])).tolist() == [UNK, 4, 15]


def test_cached_output_rows_follow_the_weights():
    model = restricted_model()
    out = torch.randn(3, model.decoder.output_dim)
    with torch.no_grad():
        before = model.output_logits(out)
        model.out_bias.add_(1.0)  # in place, as an optimiser step would
        after = model.output_logits(out)
    torch.testing.assert_close(after, before + 1.0)


def test_bad_output_vocabularies_are_refused():
    model = make_model("lstm", "luong-general", "gnmt")
    with pytest.raises(ValueError, match="must contain UNK"):
        model.set_output_vocab(torch.tensor([EOS, 4]), UNK)
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        model.set_output_vocab(torch.tensor([UNK, EOS, 16]), UNK)


def test_loss_maps_targets_to_columns_and_unseen_tokens_to_unk():
    model = restricted_model()
    assert model.column_of is not None
    logits = torch.randn(2, 3, len(KEPT))
    target = torch.tensor([[4, 12, EOS], [5, EOS, PAD]])  # 5 is not kept: scored as UNK
    loss, nll, n = label_smoothed_nll(logits, target, PAD, 0.0, model.column_of)
    log_probs = logits.log_softmax(-1)
    columns = [[KEPT.index(4), KEPT.index(12), KEPT.index(EOS)], [KEPT.index(UNK), KEPT.index(EOS)]]
    expected = -sum(log_probs[b, t, c] for b, row in enumerate(columns) for t, c in enumerate(row))
    assert int(n) == 5
    assert float(nll) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_output_vocabulary_is_saved_with_the_weights(tmp_path: Path):
    model = restricted_model(seed=1)
    ckpt.save_weights(model, tmp_path / "model.safetensors")
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["output_ids"].tolist() == KEPT
    fresh = make_model("lstm", "luong-general", "gnmt", input_feeding=True)  # full vocabulary
    ckpt.load_weights(fresh, tmp_path / "model.safetensors")
    assert fresh.output_ids is not None and fresh.output_ids.tolist() == KEPT
    assert torch.equal(fresh.column_of, model.column_of)
    # and a file without one lifts the restriction of the model it is loaded into
    plain = make_model("lstm", "luong-general", "gnmt", input_feeding=True)
    ckpt.save_weights(plain, tmp_path / "plain.safetensors")
    ckpt.load_weights(fresh, tmp_path / "plain.safetensors")
    assert fresh.output_ids is None and fresh.num_outputs == VOCAB


class SparseTableModel(TableModel):
    """TableModel whose columns stand for sparse token ids: column c is token `ids[c]`."""

    def __init__(self, table: Tensor, ids: list[int]) -> None:
        super().__init__(table)
        self.output_ids = torch.tensor(ids)
        self.to_column = {token: col for col, token in enumerate(ids)}

    def decode_step(self, prev_tokens: Tensor, state, memory):  # type: ignore[no-untyped-def]
        columns = torch.tensor([self.to_column[int(t)] for t in prev_tokens])
        return super().decode_step(columns, state, memory)


def test_search_over_columns_returns_token_ids():
    # the table's layout: 0 pad, 1 unk, 2 bos, 3 eos, 4-6 words; as sparse ids BOS and EOS
    # keep their ids, the words become 40, 50, 60
    ids = [0, 1, 2, 3, 40, 50, 60]
    sentences = [[4], [5, 6], [6, 4, 5]]
    kw = {"bos_id": 2, "eos_id": 3, "max_len_a": 1.0, "max_len_b": 2}
    for seed in range(4):
        table = random_table(seed, keys=3, steps=4)
        dense, sparse = TableModel(table), SparseTableModel(table, ids)
        g_dense = call(greedy_search, dense, *batch(*sentences), **kw)  # type: ignore[arg-type]
        g_sparse = call(greedy_search, sparse, *batch(*sentences), **kw)  # type: ignore[arg-type]
        b_dense = call(beam_search, dense, *batch(*sentences), beam_size=3, n_best=3, **kw)  # type: ignore[arg-type]
        b_sparse = call(beam_search, sparse, *batch(*sentences), beam_size=3, n_best=3, **kw)  # type: ignore[arg-type]
        for a, b in zip(g_dense, g_sparse, strict=True):
            assert [ids[c] for c in a.tokens] == b.tokens
            assert a.score == pytest.approx(b.score)
        for nbest_a, nbest_b in zip(b_dense, b_sparse, strict=True):
            assert [[ids[c] for c in h.tokens] for h in nbest_a] == [h.tokens for h in nbest_b]
            assert [h.score for h in nbest_a] == pytest.approx([h.score for h in nbest_b])


def test_trained_model_scores_the_target_sides_tokens(tiny_model_dir: Path, toy_corpus: Path):
    translator = Translator.load(tiny_model_dir)
    model, tok = translator.model, translator.tokenizer
    target_lines = (toy_corpus / "train.en").read_text(encoding="utf-8").splitlines()
    seen = {i for ids in tok.encode_tgt(target_lines) for i in ids} | {tok.unk_id, tok.eos_id}
    assert model.output_ids is not None
    assert model.output_ids.tolist() == sorted(seen)
    assert model.num_outputs < tok.tgt_vocab_size  # the joint vocabulary has source-only pieces
    card = (tiny_model_dir / "README.md").read_text(encoding="utf-8")
    assert f"| Output vocabulary | {len(seen):,} tokens" in card
    # every token of the output comes from the target side, whatever the search
    src, lengths, mask, *_ = translator._batch(tok.encode_src(["el gato negro", "la casa"]))
    kw = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "max_len_a": 1.5, "max_len_b": 5}
    hyps = call(greedy_search, model, src, lengths, mask, **kw)  # type: ignore[arg-type]
    nbest = call(beam_search, model, src, lengths, mask, beam_size=4, n_best=4, **kw)  # type: ignore[arg-type]
    for h in [*hyps, *(h for n in nbest for h in n)]:
        assert h.tokens and set(h.tokens) <= seen and math.isfinite(h.score)


@pytest.mark.parametrize("tie", [True, False])
def test_untied_and_tied_projections_restrict_the_same_way(tie: bool):
    torch.manual_seed(2)
    model = make_model("lstm", "gnmt", "gnmt", tie_output=tie).eval()
    out = torch.randn(4, model.decoder.output_dim)
    with torch.no_grad():
        full = model.output_logits(out)
        model.set_output_vocab(torch.tensor(KEPT), UNK)
        torch.testing.assert_close(model.output_logits(out), full[:, KEPT])


def test_full_output_vocabulary_keeps_every_token(toy_translation_dir: Path, tmp_path: Path):
    from test_train import tiny_cfg

    from nmt.train import train

    cfg = tiny_cfg(toy_translation_dir, "model.output_vocab=full", "train.max_steps=2",
                   "train.valid_every=2", "train.valid_max_sentences=4", "train.test_at_end=false")  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    assert "output_ids" not in load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    translator = Translator.load(tmp_path / "run" / "model")
    assert translator.model.output_ids is None
    assert translator.model.num_outputs == translator.tokenizer.tgt_vocab_size
    assert "Output vocabulary" not in (tmp_path / "run" / "model" / "README.md").read_text()


def test_search_refuses_a_model_that_cannot_end_a_sentence():
    table = random_table(0, keys=3, steps=4)
    model = SparseTableModel(table, [0, 1, 2, 30, 40, 50, 60])  # no column is EOS (id 3)
    with pytest.raises(ValueError, match=r"EOS \(id 3\) is not one of the model's output tokens"):
        call(greedy_search, model, *batch([4]), bos_id=2, eos_id=3, max_len_a=0.0, max_len_b=3)  # type: ignore[arg-type]


def test_averaging_refuses_different_output_vocabularies(tmp_path: Path):
    ckpt.save_weights(restricted_model(ids=KEPT), tmp_path / "a.safetensors")
    ckpt.save_weights(restricted_model(ids=[*KEPT, 5]), tmp_path / "b.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"(output_ids|column_of) differs from"):
        ckpt.average_checkpoints([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
