"""Data at the scale users bring: a multi-million-pair corpus through SentencePiece training,
encoding into the Arrow cache, and the first steps of `nmt train`, each stage in its own process
so that its peak resident memory is its own.

The corpus is the Bible training pairs repeated with a random word dropped from each side (and
a second one half of the time), so it is not trivially compressible; dev and test are the
Bible's. Reports encoding pairs/s, every stage's peak RSS, the time from starting the training
command to its first training step, and the cache's size on disk. Prints JSON, then a table.

    python -m benchmarks.data_scale --pairs 200000      # a quick check
    python -m benchmarks.data_scale                     # 5,000,000 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nmt.config import load_config
from nmt.corpus import read_parallel, split_files

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "bible-es-en.yaml"


def _drop_words(words: list[str], rng: random.Random) -> str:
    """The sentence without one random word (two, half of the time); one word stays."""
    words = list(words)
    for _ in range(1 + (rng.random() < 0.5)):
        if len(words) > 1:
            del words[rng.randrange(len(words))]
    return " ".join(words)


def write_scaled_corpus(bible: Path, out: Path, pairs: int, seed: int = 0) -> float:
    """Writes `pairs` training pairs and the Bible's dev/test into `out`; returns seconds taken."""
    start = time.perf_counter()
    src, tgt = split_files(bible, "train", "es", "en")
    base = [(s.split(), t.split()) for s, t in read_parallel(src, tgt)]  # ~30k pairs
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (out / "train.es").open("w", encoding="utf-8") as fs, \
         (out / "train.en").open("w", encoding="utf-8") as ft:  # fmt: skip
        for k in range(pairs):
            s, t = base[k % len(base)]
            fs.write(_drop_words(s, rng) + "\n")
            ft.write(_drop_words(t, rng) + "\n")
    for split in ("dev", "test"):
        for lang in ("es", "en"):
            shutil.copyfile(bible / f"{split}.{lang}", out / f"{split}.{lang}")
    return time.perf_counter() - start


def disk_size(path: Path) -> int:
    """Bytes of all files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_stage(cmd: list[str], watch: Path | None = None) -> dict[str, Any]:
    """Runs a command as a child process; returns its wall time, its own peak RSS (from wait4)
    and, with `watch` (a metrics.jsonl path), the wall time until its first "train" record."""
    start = time.perf_counter()
    log = Path(f"{watch.parent}.log") if watch else None
    first_step_s = None
    with open(log or os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink if watch else subprocess.PIPE,
                                stderr=subprocess.STDOUT if watch else None, text=True)  # fmt: skip
        out = proc.stdout.read() if proc.stdout else ""  # to EOF; the child is reaped by wait4
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if not watch else os.WNOHANG)
            if pid:
                break
            seen = watch is not None and watch.is_file() and '"kind": "train"' in watch.read_text()
            if first_step_s is None and seen:
                first_step_s = time.perf_counter() - start
            time.sleep(0.1)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        tail = log.read_text()[-3000:] if log else out[-3000:]
        raise RuntimeError(f"stage failed with exit code {code}: {' '.join(cmd)}\n{tail}")
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1),
                              "peak_rss_mb": round(usage.ru_maxrss / 1024)}  # fmt: skip
    if watch is not None:
        result["first_step_wall_s"] = round(first_step_s, 1) if first_step_s else None
    else:
        result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def stage_spm(corpus: Path, out: Path) -> dict[str, Any]:
    """In a child: SentencePiece training through Tokenizer.train with the config's settings."""
    from nmt.tokenizer import Tokenizer

    cfg = load_config(CONFIG, [])
    src, tgt = split_files(corpus, "train", "es", "en")
    start = time.perf_counter()
    tok = Tokenizer.train(src, tgt, out, cfg.tokenizer)
    return {"spm_s": round(time.perf_counter() - start, 1), "vocab_size": tok.src_vocab_size,
            "input_sentence_size": cfg.tokenizer.input_sentence_size}  # fmt: skip


def stage_encode(corpus: Path, tok_dir: Path, cache: Path) -> dict[str, Any]:
    """In a child: encoding and Arrow caching through EncodedCorpus.build."""
    from nmt.data import EncodedCorpus
    from nmt.tokenizer import Tokenizer

    cfg = load_config(CONFIG, [])
    src, tgt = split_files(corpus, "train", "es", "en")
    start = time.perf_counter()
    data = EncodedCorpus.build(src, tgt, Tokenizer.load(tok_dir), cache,
                               cfg.data.max_tokens, cfg.data.max_length_ratio)  # fmt: skip
    seconds = time.perf_counter() - start
    read = data.stats.kept + data.stats.total_dropped
    return {"encode_s": round(seconds, 1), "pairs_read": read, "pairs_kept": len(data),
            "encode_pairs_per_s": round(read / seconds), "cache_mb": round(disk_size(cache) / 2**20),
            "buckets": list(data.buckets.boundaries)}  # fmt: skip


def run(pairs: int, work: Path, bible: Path, steps: int, keep: bool) -> dict[str, Any]:
    corpus, tok_dir = work / "corpus", work / "tokenizer"
    cache, run_dir = work / "cache", work / "run"
    shutil.rmtree(work, ignore_errors=True)
    write_s = write_scaled_corpus(bible, corpus, pairs)
    me = [sys.executable, "-m", "benchmarks.data_scale", "--work-dir", str(work)]
    result: dict[str, Any] = {
        "benchmark": "data_scale", "pairs": pairs, "write_corpus_s": round(write_s, 1),
        "corpus_mb": round(disk_size(corpus) / 2**20),
    }  # fmt: skip
    result["spm"] = run_stage([*me, "--stage", "spm"])
    result["encode"] = run_stage([*me, "--stage", "encode"])
    # the training command reuses the tokenizer and the cache, so it measures what a run adds
    shutil.copytree(tok_dir, run_dir / "tokenizer")
    overrides = [f"data.corpus={corpus}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
                 "train.log_every=1", "train.max_minutes=0", "train.test_at_end=false",
                 "train.valid_every=1000000", "train.valid_max_sentences=32"]  # fmt: skip
    train_cmd = [sys.executable, "-m", "nmt.cli", "train", "--config", str(CONFIG),
                 "--run-dir", str(run_dir), "--no-progress"]  # fmt: skip
    for override in overrides:
        train_cmd += ["--set", override]
    result["train"] = run_stage(train_cmd, watch=run_dir / "metrics.jsonl")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    if train_records:
        first = train_records[0]
        result["train"]["first_step_s_in_loop"] = first.get("time")
        result["train"]["steps"] = train_records[-1]["step"]
    log = Path(f"{run_dir}.log").read_text()
    result["train"]["reused_cache"] = "reusing encoded corpus" in log
    result["train"]["retrained_tokenizer"] = "training SentencePiece" in log
    result["cache_mb"] = round(disk_size(cache) / 2**20)
    result["peak_rss_mb_max"] = max(result[s]["peak_rss_mb"] for s in ("spm", "encode", "train"))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def summary(r: dict[str, Any]) -> str:
    e, t = r["encode"], r["train"]
    rows = [
        ("write corpus", f"{r['write_corpus_s']} s", "-", f"{r['corpus_mb']} MB of text"),
        ("SentencePiece", f"{r['spm']['seconds']} s", f"{r['spm']['peak_rss_mb']} MB",
         f"input_sentence_size {r['spm']['input_sentence_size']:,}"),
        ("encode + cache", f"{r['encode']['seconds']} s", f"{e['peak_rss_mb']} MB",
         f"{e['encode_pairs_per_s']:,} pairs/s, cache {r['cache_mb']} MB"),
        ("nmt train", f"{t['seconds']} s", f"{t['peak_rss_mb']} MB",
         f"first step after {t['first_step_wall_s']} s, {t.get('steps')} steps"),
    ]  # fmt: skip
    lines = [f"{r['pairs']:,} pairs", f"{'stage':<16}{'wall':>10}{'peak RSS':>12}  notes"]
    lines += [f"{a:<16}{b:>10}{c:>12}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5_000_000)
    p.add_argument("--bible", type=Path, default=ROOT / "data" / "bible-es-en")
    p.add_argument("--work-dir", type=Path, default=ROOT / "data" / ".bench-scale")
    p.add_argument("--steps", type=int, default=200, help="training steps of the last stage")
    p.add_argument("--keep", action="store_true", help="keep the corpus, cache and run")
    p.add_argument("--stage", choices=["spm", "encode"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = args.work_dir
    if args.stage == "spm":
        print(json.dumps(stage_spm(work / "corpus", work / "tokenizer")))
        return 0
    if args.stage == "encode":
        # under cache/train, where `nmt train` with data.cache_dir=cache looks for it
        print(
            json.dumps(stage_encode(work / "corpus", work / "tokenizer", work / "cache" / "train"))
        )
        return 0
    result = run(args.pairs, work, args.bible, args.steps, args.keep)
    print(json.dumps(result))
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
