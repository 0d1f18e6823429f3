"""Training throughput on the Bible corpus: a bounded `nmt train` run, target tokens/s and dev BLEU,
and the same speed as a fraction of this machine's matmul peak, measured in the same run.

python -m benchmarks.train_speed --minutes 3 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.peak import flops_per_target_token, matmul_peaks
from nmt.config import Config, load_config
from nmt.corpus import split_files
from nmt.data import EncodedCorpus
from nmt.tokenizer import Tokenizer
from nmt.train import train


class DataShape(NamedTuple):
    mean_src_len: float  # source subwords per sentence
    mean_tgt_len: float  # target subwords per sentence, without EOS
    num_outputs: int  # columns of the model's output projection


def data_shape(cfg: Config, run_dir: Path) -> DataShape:
    """Mean lengths of the run's encoded training data (its cache, or encoded again with its
    tokenizer) and the output columns the model has: the target-side tokens plus UNK and EOS
    with `output_vocab: target`, as the training loop builds it; else the target vocabulary."""
    tok_dir = next(p for p in (run_dir / "tokenizer", run_dir / "model") if p.is_dir())
    tok = Tokenizer.load(tok_dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    found = sorted((cache / "train").glob("*/meta.json"))
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        if found:
            data = EncodedCorpus(found[-1].parent)
        else:
            d = cfg.data
            if d.train_src and d.train_tgt:
                src, tgt = Path(d.train_src), Path(d.train_tgt)
            else:
                assert d.corpus is not None, "data.corpus or data.train_src/train_tgt must be set"
                src, tgt = split_files(d.corpus, "train", d.src_lang, d.tgt_lang)
            data = EncodedCorpus.build(src, tgt, tok, tmp, d.max_tokens, d.max_length_ratio)
        if cfg.model.output_vocab == "target":
            outputs = len({*data.target_token_ids().tolist(), tok.unk_id, tok.eos_id})
        else:
            outputs = tok.tgt_vocab_size
        shape = DataShape(float(data.src_lengths.mean()), float(data.tgt_lengths.mean()), outputs)
        del data  # unmap before the folder goes
    return shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/bible-es-en.yaml"))
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench-train"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    cfg = load_config(args.config, [f"train.max_minutes={args.minutes}",
                                    f"train.precision={args.precision}", "train.log_every=20",
                                    "train.test_at_end=false",
                                    *args.overrides])  # fmt: skip
    device = "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    peaks = matmul_peaks(device)  # before training: the same machine, the same moment
    result = train(cfg, args.run_dir, progress=False)
    speeds = [r["tokens_per_s"] for r in result.history if r.get("kind") == "train"][1:]
    valid = [r for r in result.history if r.get("kind") == "valid"]
    shape = data_shape(cfg, args.run_dir)
    per_token = flops_per_target_token(cfg.model, *shape)
    tokens_per_s = statistics.median(speeds) if speeds else None
    achieved = tokens_per_s * per_token / 1e9 if tokens_per_s else None
    peak = peaks[args.precision]
    print(json.dumps({
        "config": str(args.config), "overrides": args.overrides, "precision": args.precision,
        "minutes": args.minutes,
        "steps": result.step, "tgt_tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "dev_bleu": round(valid[-1]["dev_bleu"], 2) if valid else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mean_src_len": round(shape.mean_src_len, 2), "mean_tgt_len": round(shape.mean_tgt_len, 2),
        "output_columns": shape.num_outputs,
        "train_mflop_per_tgt_token": round(per_token / 1e6, 2),
        "achieved_gflops": round(achieved, 1) if achieved else None,
        "matmul_peak_gflops": {k: vars(v) for k, v in peaks.items()},
        "fraction_of_peak": round(achieved / peak.best_gflops, 4) if achieved else None,
        "fraction_of_median_peak": round(achieved / peak.median_gflops, 4) if achieved else None,
        "device": device,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
