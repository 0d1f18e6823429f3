"""Scoring during and after training: dev loss, perplexity and BLEU of a model, and the test
split's scores for the model card."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from nmt import checkpoint as ckpt
from nmt.config import Config, ConfigError
from nmt.corpus import CorpusError, split_files
from nmt.data import EncodedCorpus, TokenBatchSampler
from nmt.loss import label_smoothed_nll
from nmt.metrics import corpus_scores
from nmt.model import Seq2Seq
from nmt.search import beam_search, greedy_search
from nmt.tokenizer import Tokenizer
from nmt.train_report import model_card
from nmt.translate import autocast

logger = logging.getLogger(__name__)


def resolve_split(cfg: Config, split: str) -> tuple[Path, Path]:
    """Source and target files of a split, from explicit paths or the corpus folder."""
    d = cfg.data
    explicit = {"train": (d.train_src, d.train_tgt), "dev": (d.dev_src, d.dev_tgt)}.get(split)
    if explicit and explicit[0] and explicit[1]:
        for p in explicit:
            if not Path(p).is_file():  # type: ignore[arg-type]
                raise ConfigError(f"data.{split}_src/{split}_tgt: file not found: {p}")
        return Path(explicit[0]), Path(explicit[1])
    if d.corpus is None:
        raise ConfigError(f"data: no {split} files; set data.corpus or data.{split}_src/_tgt")
    return split_files(Path(d.corpus), split, d.src_lang, d.tgt_lang)


@torch.no_grad()
def validate(
    model: Seq2Seq,
    dev: EncodedCorpus,
    dev_refs: list[str],
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    precision: str,
    length_ratio: tuple[float, float],
) -> dict[str, Any]:
    """Dev loss, perplexity and detokenised BLEU/chrF of greedy (or small-beam) output."""
    inner = model
    inner.eval()
    tc = cfg.train
    n = len(dev) if tc.valid_max_sentences <= 0 else min(len(dev), tc.valid_max_sentences)
    sampler = TokenBatchSampler(
        dev.src_lengths[:n], dev.tgt_lengths[:n], cfg.train.batch_tokens, seed=0, shuffle=False
    )
    loss_sum = nll_sum = 0.0
    tokens = 0
    hyps: dict[int, list[int]] = {}
    for idx in sampler:
        batch = dev.batch(idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).to(device)
        with autocast(device, precision):
            logits = inner(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)
            loss, nll, n_tok = label_smoothed_nll(
                logits, batch.tgt_out, tokenizer.pad_id, 0.0, inner.column_of
            )
            if tc.valid_beam_size > 1:
                results = [
                    h[0]
                    for h in beam_search(
                        inner,
                        batch.src,
                        batch.src_lengths,
                        batch.src_mask,
                        bos_id=tokenizer.bos_id,
                        eos_id=tokenizer.eos_id,
                        beam_size=tc.valid_beam_size,
                        length_penalty=cfg.decode.length_penalty,
                        max_len_a=length_ratio[0],
                        max_len_b=int(length_ratio[1]),
                    )  # fmt: skip
                ]
            else:
                results = greedy_search(
                    inner, batch.src, batch.src_lengths, batch.src_mask,
                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                    max_len_a=length_ratio[0], max_len_b=int(length_ratio[1]),
                )  # fmt: skip
        loss_sum += float(loss)
        nll_sum += float(nll)
        tokens += int(n_tok)
        for i, h in zip(idx, results):
            hyps[int(i)] = h.tokens
    order = sorted(hyps)
    texts = tokenizer.decode_tgt([hyps[i] for i in order])
    refs = [dev_refs[i] for i in order]
    scores = corpus_scores(texts, [refs])
    inner.train()
    nll_avg = nll_sum / max(tokens, 1)
    return {
        "dev_loss": loss_sum / max(tokens, 1),
        "dev_nll": nll_avg,
        "dev_ppl": math.exp(min(nll_avg, 50.0)),
        "dev_bleu": scores.bleu,
        "dev_chrf": scores.chrf,
        "bleu_signature": scores.bleu_signature,
        "dev_sentences": len(order),
    }


def record_test_scores(cfg: Config, model_dir: Path, device: torch.device, precision: str) -> None:
    """Scores the best model on the corpus's test split (if it has one) for the model card.

    Only reported, never used to choose anything: selection happens on the dev split.
    """
    try:
        src_path, ref_path = resolve_split(cfg, "test")
    except (ConfigError, CorpusError):
        return
    from nmt.translate import Translator, translate_corpus

    translator = Translator.load(model_dir, device=str(device),
                                 precision="bf16" if precision == "bf16" else "fp32")  # fmt: skip
    src = src_path.read_text(encoding="utf-8").splitlines()
    refs = ref_path.read_text(encoding="utf-8").splitlines()
    hyps = [""] * len(src)
    for i, result in translate_corpus(translator, src):
        hyps[i] = result.text
    scores = corpus_scores(hyps, [refs])
    meta = json.loads((model_dir / ckpt.META_FILE).read_text(encoding="utf-8"))
    meta["scores"].update({"test_bleu": scores.bleu, "test_chrf": scores.chrf,
                           "test_beam_size": cfg.decode.beam_size, "test_data": str(src_path)})  # fmt: skip
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, meta)
    ckpt.write_text_atomic(model_dir / "README.md", model_card(cfg, meta))
    logger.info("test split %s: BLEU %.2f (beam %d), chrF %.2f", src_path, scores.bleu,
                cfg.decode.beam_size, scores.chrf)  # fmt: skip
