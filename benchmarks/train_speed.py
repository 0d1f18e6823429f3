"""Training throughput on the Bible corpus: a bounded `nmt train` run, target tokens/s and dev BLEU.

python -m benchmarks.train_speed --minutes 3 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
from pathlib import Path

from nmt.config import load_config
from nmt.train import train


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
    result = train(cfg, args.run_dir, progress=False)
    speeds = [r["tokens_per_s"] for r in result.history if r.get("kind") == "train"][1:]
    valid = [r for r in result.history if r.get("kind") == "valid"]
    print(json.dumps({
        "config": str(args.config), "precision": args.precision, "minutes": args.minutes,
        "steps": result.step, "tgt_tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "dev_bleu": round(valid[-1]["dev_bleu"], 2) if valid else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
