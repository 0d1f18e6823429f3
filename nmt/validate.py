"""Scoring during and after training: dev loss, perplexity and BLEU of a model, and the test
split's scores for the model card."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nmt import checkpoint as ckpt
from nmt.config import Config, ConfigError
from nmt.corpus import CorpusError, read_lines, require_pairs, split_files
from nmt.data import EncodedCorpus, TokenBatchSampler
from nmt.loss import label_smoothed_nll
from nmt.metrics import corpus_scores
from nmt.model import Seq2Seq
from nmt.simultaneous import default_wait_k, wait_k_texts
from nmt.tokenizer import Tokenizer
from nmt.train_report import model_card
from nmt.translate import Translator, autocast, translate_encoded

logger = logging.getLogger(__name__)


def resolve_split(cfg: Config, split: str) -> tuple[Path, Path]:
    """Source and target files of a split, from explicit paths or the corpus folder.

    Raises:
        ConfigError: the config names no such files, or they do not exist.
        CorpusError: the corpus folder lacks the split, or the train or dev split holds no
            pair with text on both sides (found before any work is spent on it).
    """
    d = cfg.data
    explicit = {"train": (d.train_src, d.train_tgt), "dev": (d.dev_src, d.dev_tgt)}.get(split)
    if explicit and explicit[0] and explicit[1]:
        for p in explicit:
            if not Path(p).is_file():  # type: ignore[arg-type]
                raise ConfigError(f"data.{split}_src/{split}_tgt: file not found: {p}")
        files = Path(explicit[0]), Path(explicit[1])
    elif d.corpus is None:
        raise ConfigError(f"data: no {split} files; set data.corpus or data.{split}_src/_tgt")
    else:
        files = split_files(Path(d.corpus), split, d.src_lang, d.tgt_lang)
    if split in ("train", "dev"):
        require_pairs(*files)
    return files


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
    """Dev loss, perplexity and detokenised BLEU/chrF of the first `train.valid_max_sentences`
    dev sentences (all: 0), decoded through the Translator with the model's decoding rules at
    `train.valid_beam_size`, exactly as `nmt evaluate --beam-size K` decodes them.

    A model trained wait-k (`train.wait_k`) is scored as it will be used: its loss under the
    wait-k mask and its BLEU from wait-k decoding, at its live k (`default_wait_k`: the training
    k, or 3 within a multi-k range), so checkpoints are chosen for simultaneous translation."""
    inner = model
    inner.eval()
    tc = cfg.train
    wait_k = default_wait_k(cfg) if tc.wait_k is not None else None
    n = len(dev) if tc.valid_max_sentences <= 0 else min(len(dev), tc.valid_max_sentences)
    sampler = TokenBatchSampler(
        dev.src_lengths[:n], dev.tgt_lengths[:n], cfg.train.batch_tokens, seed=0, shuffle=False
    )
    loss_sum = nll_sum = 0.0
    tokens = 0
    for idx in sampler:
        batch = dev.batch(idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).to(device)
        with autocast(device, precision):
            logits = inner(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in,
                           wait_k=wait_k)  # fmt: skip
            loss, nll, n_tok = label_smoothed_nll(
                logits, batch.tgt_out, tokenizer.pad_id, 0.0, inner.column_of
            )
        loss_sum += float(loss)
        nll_sum += float(nll)
        tokens += int(n_tok)
    # decoded as `nmt evaluate` decodes: the same Translator, options and batching
    translator = Translator(inner, tokenizer, cfg, {"length_ratio": list(length_ratio)}, device,
                            precision)  # fmt: skip
    options = replace(translator.options, beam_size=tc.valid_beam_size, n_best=1)
    texts = [""] * n
    if wait_k is None:
        for i, result in translate_encoded(translator, dev.src_ids(n), options):
            texts[i] = result.text
    else:
        texts = wait_k_texts(translator, dev.src_ids(n), wait_k, options)
    refs = dev_refs[:n]
    scores = corpus_scores(texts, [refs])
    inner.train()
    nll_avg = nll_sum / max(tokens, 1)
    extra = {} if wait_k is None else {"dev_wait_k": wait_k}
    return {
        **extra,
        "dev_loss": loss_sum / max(tokens, 1),
        "dev_nll": nll_avg,
        "dev_ppl": math.exp(min(nll_avg, 50.0)),
        "dev_bleu": scores.bleu,
        "dev_chrf": scores.chrf,
        "bleu_signature": scores.bleu_signature,
        "dev_sentences": n,
    }


def score_on_dev(model_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Dev scores of a model directory (e.g. averaged weights), computed as validation during
    training computes them: `validate` on the dev split of the model's config, with the length
    ratio of its training data.

    Raises:
        ConfigError, CorpusError: the dev split the config names is not there (any more).
        ModelFileError: the model directory is broken.
    """
    from nmt.translate import Translator

    cfg, meta = ckpt.read_model_dir(model_dir)
    src_path, ref_path = resolve_split(cfg, "dev")
    translator = Translator.load(model_dir, device=device)
    tokenizer = translator.tokenizer
    refs = list(read_lines(ref_path))
    a, b = meta.get("length_ratio") or (translator.options.max_len_a, translator.options.max_len_b)
    with tempfile.TemporaryDirectory() as cache:  # built as the training run builds its dev set
        dev = EncodedCorpus.build(src_path, ref_path, tokenizer, cache, 10_000, 1e9)
        row_refs = [refs[int(line)] for line in dev.lines]  # rows skip empty lines
        model = translator.model
        assert isinstance(model, Seq2Seq)  # one directory: never an ensemble
        return validate(model, dev, row_refs, tokenizer, cfg, translator.device, "fp32",
                        (float(a), float(b)))  # fmt: skip


def write_averaged_model(
    run_dir: Path, checkpoints: list[Path], out: Path, device: str = "cpu", score: bool = True
) -> dict[str, Any]:
    """Writes a model directory holding the mean of the checkpoints' weights, with the run's
    tokenizer and config, and returns its meta.

    Its meta.json and model card carry the averaged weights' own dev scores (`score_on_dev`),
    or say "unscored: averaged from checkpoints ..." when `score` is False or the run's dev split
    is not at hand: never the scores of the run's shipped model.

    Raises:
        ModelFileError: a checkpoint or the run's model directory is broken (nothing written).
    """
    source = Path(run_dir) / "model"
    cfg, meta = ckpt.read_model_dir(source)
    weights = ckpt.average_checkpoints(checkpoints)
    names = [d.name for d in checkpoints]
    meta = {k: v for k, v in meta.items() if k not in ("scores", "selection", "weights")}
    meta.update(averaged_from=names, weights=f"average of checkpoints {', '.join(names)}",
                scores={}, unscored=f"averaged from checkpoints {', '.join(names)}")  # fmt: skip
    try:  # the last checkpoint's place in training (its state holds the loop counters)
        loop = ckpt.load_checkpoint_state(checkpoints[-1])["loop"]
        meta.update(step=loop["step"], epoch=loop["epoch"],
                    train_minutes=round(loop["elapsed"] / 60, 2))  # fmt: skip
    except (ckpt.CheckpointError, KeyError, TypeError):
        for key in ("step", "epoch", "train_minutes"):
            meta.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    Tokenizer.load(source).save(out)
    with ckpt.atomic_path(out / ckpt.CONFIG_FILE) as tmp:
        shutil.copyfile(source / ckpt.CONFIG_FILE, tmp)
    ckpt.save_averaged(weights, out / ckpt.MODEL_FILE)
    _write_meta_and_card(out, cfg, meta)  # unscored until scored, should scoring fail
    if not score:
        return meta
    try:
        record = score_on_dev(out, device)
    except (ConfigError, CorpusError) as err:
        logger.warning("%s: dev split not available, the averaged model is unscored: %s", out, err)
        return meta
    del meta["unscored"]
    meta["scores"] = {"dev_bleu": record["dev_bleu"], "dev_chrf": record["dev_chrf"],
                      "bleu_signature": record["bleu_signature"], "step": meta.get("step"),
                      "dev_sentences": record["dev_sentences"]}  # fmt: skip
    _write_meta_and_card(out, cfg, meta)
    return meta


def _write_meta_and_card(model_dir: Path, cfg: Config, meta: dict[str, Any]) -> None:
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, meta)
    ckpt.write_text_atomic(model_dir / "README.md", model_card(cfg, meta))


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
    src = list(read_lines(src_path))  # lines split as the training data's are
    refs = list(read_lines(ref_path))
    hyps = [""] * len(src)
    for i, result in translate_corpus(translator, src):
        hyps[i] = result.text
    scores = corpus_scores(hyps, [refs])
    meta = json.loads((model_dir / ckpt.META_FILE).read_text(encoding="utf-8"))
    meta["scores"].update({"test_bleu": scores.bleu, "test_chrf": scores.chrf,
                           "test_beam_size": cfg.decode.beam_size, "test_data": str(src_path)})  # fmt: skip
    if cfg.train.wait_k is not None:  # also as it is meant to be used
        k = default_wait_k(cfg)
        ids = translator.tokenizer.encode_src(src)
        wait_k_hyps = wait_k_texts(translator, ids, k)
        meta["scores"].update({"test_wait_k": k,
                               "test_wait_k_bleu": corpus_scores(wait_k_hyps, [refs]).bleu})  # fmt: skip
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, meta)
    ckpt.write_text_atomic(model_dir / "README.md", model_card(cfg, meta))
    logger.info("test split %s: BLEU %.2f (beam %d), chrF %.2f", src_path, scores.bleu,
                cfg.decode.beam_size, scores.chrf)  # fmt: skip


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (tied values get their average rank)."""
    import numpy as np

    def ranks(x: list[float]) -> Any:
        values = np.asarray(x, dtype=np.float64)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=np.float64)
        for v in np.unique(values):  # average rank for ties
            tied = values == v
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def calibrate_confidence(translator: Translator, src: list[str], refs: list[str]) -> dict[str, Any]:
    """A linear fit of sentence chrF / 100 on the translations' `confidence_features`, by least
    squares over these sentences; `Translator` turns it into each translation's confidence."""
    import numpy as np
    from sacrebleu.metrics import CHRF

    from nmt.translate import CONFIDENCE_FEATURES, confidence, translate_corpus

    results: list[Any] = [None] * len(src)
    for i, result in translate_corpus(translator, src):
        results[i] = result
    chrf = CHRF()
    target = [chrf.sentence_score(r.text, [ref]).score / 100 for r, ref in zip(results, refs)]
    x = np.array([list(r.features) + [1.0] for r in results], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, np.array(target), rcond=None)
    calibration: dict[str, Any] = {
        "features": list(CONFIDENCE_FEATURES),
        "weights": [round(float(w), 6) for w in coef[:-1]],
        "bias": round(float(coef[-1]), 6),
        "target": "sentence chrF / 100",
        "dev_sentences": len(src),
    }
    predicted = [confidence(r.features, calibration) for r in results]
    calibration["dev_spearman"] = round(spearman(predicted, target), 4)
    return calibration


CALIBRATION_SENTENCES = 2000  # dev sentences the confidence calibration uses at most


def record_confidence_calibration(
    cfg: Config, model_dir: Path, device: torch.device, precision: str
) -> None:
    """Calibrates the shipped model's confidence on the dev split and stores it in meta.json
    (`confidence`) and the model card."""
    try:
        src_path, ref_path = resolve_split(cfg, "dev")
    except (ConfigError, CorpusError):
        return
    translator = Translator.load(model_dir, device=str(device),
                                 precision="bf16" if precision == "bf16" else "fp32")  # fmt: skip
    src = list(read_lines(src_path))[:CALIBRATION_SENTENCES]
    refs = list(read_lines(ref_path))[:CALIBRATION_SENTENCES]
    calibration = calibrate_confidence(translator, src, refs)
    meta = json.loads((model_dir / ckpt.META_FILE).read_text(encoding="utf-8"))
    meta["confidence"] = calibration
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, meta)
    ckpt.write_text_atomic(model_dir / "README.md", model_card(cfg, meta))
    logger.info("confidence calibrated on %d dev sentences (Spearman %.3f with sentence chrF)",
                len(src), calibration["dev_spearman"])  # fmt: skip
