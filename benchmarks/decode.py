"""Test-set translation speed and BLEU: greedy and beam 5, fp32 against bf16 (int8: benchmarks.onnx).

Each setting runs in its own process (so peak memory is its own), translates the whole source
file sorted by length in token-bounded batches, and reports sentences/s, target tokens/s,
detokenised BLEU/chrF and peak resident memory. Prints one JSON line per setting.

    python -m benchmarks.decode --model runs/bible-es-en/model \
        --src data/bible-es-en/test.es --ref data/bible-es-en/test.en
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETTINGS = [
    ("greedy", 1, "fp32", False),
    ("greedy", 1, "bf16", False),
    ("beam5", 5, "fp32", False),
    ("beam5", 5, "bf16", False),
]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Translates the source file once (after a short warm-up) and scores it."""
    import torch

    from nmt.metrics import corpus_scores
    from nmt.translate import Translator, translate_corpus

    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model if len(args.model) > 1 else args.model[0]
    translator = Translator.load(models, precision=args.precision, quantize=args.quantize)
    options = translator.with_options(beam_size=args.beam)
    src = args.src.read_text(encoding="utf-8").splitlines()
    refs = args.ref.read_text(encoding="utf-8").splitlines()
    if args.limit:
        src, refs = src[: args.limit], refs[: args.limit]
    for _ in translate_corpus(translator, src[:64], options):
        pass  # warm-up: first-seen shapes build their kernels
    start = time.perf_counter()
    results: list[Any] = [None] * len(src)
    for i, r in translate_corpus(translator, src, options, batch_tokens=args.batch_tokens):
        results[i] = r
    seconds = time.perf_counter() - start
    hyps = [r.text for r in results]
    tokens = sum(len(t) + 1 for t in translator.tokenizer.encode_tgt(hyps))
    scores = corpus_scores(hyps, [refs])
    return {
        "search": args.name,
        "models": len(args.model),
        "beam_size": args.beam,
        "precision": args.precision + ("+int8" if args.quantize else ""),
        "sentences": len(src),
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(src) / seconds, 1),
        "tgt_tokens_per_s": round(tokens / seconds, 0),
        "bleu": round(scores.bleu, 2),
        "chrf": round(scores.chrf, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "bleu_signature": scores.bleu_signature,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, nargs="+", default=[Path("runs/bible-es-en/model")],
                   help="model directory; several: an ensemble")  # fmt: skip
    p.add_argument("--src", type=Path, default=Path("data/bible-es-en/test.es"))
    p.add_argument("--ref", type=Path, default=Path("data/bible-es-en/test.en"))
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated names, e.g. beam5-bf16")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    # one setting, in a child process
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--beam", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.name:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    missing = [m for m in args.model if not (m / "model.safetensors").is_file()]
    if missing:
        print(f"no model at {missing[0]}: train one first (make demo)", file=sys.stderr)
        return 2
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for name, beam, precision, quantize in SETTINGS:
        label = f"{name}-{precision}{'-int8' if quantize else ''}"
        if wanted and label not in wanted:
            continue
        cmd = [sys.executable, "-m", "benchmarks.decode", "--model", *map(str, args.model),
               "--src", str(args.src), "--ref", str(args.ref), "--name", name,
               "--beam", str(beam), "--precision", precision, "--limit", str(args.limit),
               "--threads", str(args.threads)]  # fmt: skip
        if args.batch_tokens:
            cmd += ["--batch-tokens", str(args.batch_tokens)]
        if quantize:
            cmd.append("--quantize")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| search | precision | sentences/s | tgt tokens/s | BLEU | chrF | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['search']} | {r['precision']} | {r['sentences_per_s']} | "
              f"{r['tgt_tokens_per_s']:.0f} | {r['bleu']} | {r['chrf']} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
