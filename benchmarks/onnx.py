"""PyTorch against ONNX Runtime on the Bible test set: speed, memory, BLEU and output parity.

Exports the model (fp32 and int8 graphs) once, then decodes the test set greedy and beam 5 with
PyTorch fp32 / bf16 and ONNX Runtime fp32 / int8, each
setting in its own process (so peak memory is its own; the ONNX ones with torch unimportable).
Reports sentences/s, BLEU, chrF, peak RSS, the share of sentences identical to PyTorch fp32's
output under the same search, and the installed size of the runtime's dependencies.

    python -m benchmarks.onnx --model runs/bible-es-en/model --work /tmp/onnx-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

SEARCHES = {"greedy": 1, "beam5": 5}
ENGINES = ["torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Translates the source file once (after a warm-up) in this process; writes the output."""
    src = args.src.read_text(encoding="utf-8").splitlines()
    if args.limit:
        src = src[: args.limit]
    beam = SEARCHES[args.search]
    if args.engine.startswith("onnx"):
        sys.modules["torch"] = None  # type: ignore[assignment]  # prove the runtime needs none
        from nmt.runtime import OnnxTranslator

        onnx = OnnxTranslator.load(args.work / args.engine, threads=args.threads)
        options = onnx.with_options(beam_size=beam)
        onnx.translate_corpus(src[:64], options)  # warm-up

        def translate() -> list[str]:
            results = onnx.translate_corpus(src, options, batch_tokens=args.batch_tokens)
            return [r.text for r in results]
    else:
        import torch

        from nmt.translate import Translator, translate_corpus

        if args.threads:
            torch.set_num_threads(args.threads)
        precision = "bf16" if args.engine == "torch-bf16" else "fp32"
        pt = Translator.load(args.model, precision=precision)
        options = pt.with_options(beam_size=beam)
        for _ in translate_corpus(pt, src[:64], options):
            pass  # warm-up: first-seen shapes build their kernels

        def translate() -> list[str]:
            hyps = [""] * len(src)
            for i, r in translate_corpus(pt, src, options, batch_tokens=args.batch_tokens):
                hyps[i] = r.text
            return hyps

    start = time.perf_counter()
    hyps = translate()
    seconds = time.perf_counter() - start
    out = args.work / f"{args.search}-{args.engine}.txt"
    out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return {
        "search": args.search,
        "engine": args.engine,
        "sentences": len(src),
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(src) / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb()),
        "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: unlike ru_maxrss, not
    inherited from the parent that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def installed_mb(*names: str) -> float:
    """Disk size of installed distributions (their files as recorded by pip), in MB."""
    total = 0
    for name in names:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                total += path.stat().st_size
    return total / 2**20


# what `pip install onnxruntime numpy sentencepiece pyyaml` brings, against torch's own wheel
RUNTIME_DISTS = ["onnxruntime", "numpy", "sentencepiece", "pyyaml", "protobuf", "flatbuffers",
                 "packaging"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/bible-es-en/model"))
    p.add_argument("--src", type=Path, default=Path("data/bible-es-en/test.es"))
    p.add_argument("--ref", type=Path, default=Path("data/bible-es-en/test.en"))
    p.add_argument("--work", type=Path, default=None, help="exported models and outputs here")
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated SEARCH-ENGINE, e.g. beam5-onnx-int8")
    # one setting, in a child process
    p.add_argument("--search", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    args.work = args.work or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    from nmt.export import export_onnx

    if not (args.work / "onnx-fp32").is_dir():
        start = time.perf_counter()
        export_onnx(args.model, args.work / "onnx-fp32")
        print(f"export: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if not (args.work / "onnx-int8").is_dir():
        export_onnx(args.model, args.work / "onnx-int8", int8=True)
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for search in SEARCHES:
        for engine in ENGINES:
            if wanted and f"{search}-{engine}" not in wanted:
                continue
            cmd = [sys.executable, "-m", "benchmarks.onnx", "--model", str(args.model),
                   "--src", str(args.src), "--work", str(args.work), "--search", search,
                   "--engine", engine, "--limit", str(args.limit), "--threads", str(args.threads)]  # fmt: skip
            if args.batch_tokens:
                cmd += ["--batch-tokens", str(args.batch_tokens)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    score_rows(args, rows)
    sizes = {
        "runtime_deps_mb": round(installed_mb(*RUNTIME_DISTS), 1),
        "onnxruntime_mb": round(installed_mb("onnxruntime"), 1),
        "torch_mb": round(installed_mb("torch"), 1),
        "exported_fp32_mb": round(_dir_mb(args.work / "onnx-fp32"), 1),
        "exported_int8_mb": round(_dir_mb(args.work / "onnx-int8"), 1),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    print(json.dumps(sizes))
    print(
        "\n| search | engine | sentences/s | BLEU | chrF | identical to torch fp32 | peak RSS MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['search']} | {r['engine']} | {r['sentences_per_s']} | {r['bleu']} | "
              f"{r['chrf']} | {r['identical']} | {r['peak_rss_mb']} |")  # fmt: skip
    return 0


def score_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Adds BLEU, chrF and the share of outputs identical to torch fp32's (same search)."""
    from nmt.metrics import corpus_scores

    refs = args.ref.read_text(encoding="utf-8").splitlines()
    for r in rows:
        hyps = (args.work / f"{r['search']}-{r['engine']}.txt").read_text("utf-8").splitlines()
        scores = corpus_scores(hyps, [refs[: len(hyps)]])
        r["bleu"], r["chrf"] = round(scores.bleu, 2), round(scores.chrf, 2)
        base = args.work / f"{r['search']}-torch-fp32.txt"
        if base.is_file():
            same = sum(a == b for a, b in zip(hyps, base.read_text("utf-8").splitlines()))
            r["identical"] = f"{100 * same / len(hyps):.1f}%"
        else:
            r["identical"] = "-"


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


if __name__ == "__main__":
    sys.exit(main())
