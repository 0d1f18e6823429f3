"""The LibreTranslate-compatible endpoint under load, the translation cache, and confidence.

Three measurements on one model directory (es -> en by default, the Bible split):

1. throughput of `POST /translate` with paragraph input (each request: two paragraphs of three
   test sentences), as translated sentences per second, at several numbers of closed-loop clients,
   cache off;
2. a workload with repeated strings (single sentences drawn at random from a small pool), cache
   off and on: sentences per second, and the hit rate read from /metrics;
3. confidence: calibrated on the dev split as training does, then Spearman's correlation of the
   test sentences' confidence with their sentence chrF.

    python -m benchmarks.libretranslate_load --model runs/NAME/model --data data/bible-es-en
    python -m benchmarks.libretranslate_load ... --clients 1,8 --seconds 5 --test-sentences 300

Clients run on the same machine as the server and compete with it for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import httpx

from serve.runner import serve_in_subprocess


def paragraphs(sentences: list[str], per_request: int = 6) -> list[str]:
    """Request texts: two paragraphs of three sentences each."""
    out = []
    for i in range(0, len(sentences) - per_request + 1, per_request):
        chunk = sentences[i : i + per_request]
        half = per_request // 2
        out.append(" ".join(chunk[:half]) + "\n\n" + " ".join(chunk[half:]))
    return out


async def closed_loop(
    url: str, bodies: list[dict[str, Any]], counts: list[int], clients: int, seconds: float
) -> dict[str, float]:
    """`clients` loops, each posting the next body and waiting for its answer, for `seconds`."""
    done = errors = sentences = 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(0)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done, errors, sentences
        while time.perf_counter() < deadline:
            i = rng.randrange(len(bodies))
            r = await http.post(f"{url}/translate", json=bodies[i])
            if r.status_code == 200:
                done += 1
                sentences += counts[i]
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": done, "errors": errors, "seconds": round(elapsed, 1),
            "sentences_per_s": round(sentences / elapsed, 1)}  # fmt: skip


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def throughput(
    model: str, src: list[str], clients: list[int], seconds: float
) -> list[dict[str, Any]]:
    from nmt.segment import segment_text

    texts = paragraphs(src)
    bodies = [{"q": t, "source": "es", "target": "en"} for t in texts]
    counts = [len(segment_text(t, "es").sentences) for t in texts]
    rows = []
    with serve_in_subprocess(model, {"NMT_CACHE_SIZE": "0", "NMT_API_KEYS": None}) as (url, _):
        asyncio.run(closed_loop(url, bodies[:4], counts[:4], 1, 2.0))  # warm up
        for n in clients:
            row = asyncio.run(closed_loop(url, bodies, counts, n, seconds))
            print(json.dumps({"measure": "paragraphs", **row}), flush=True)
            rows.append(row)
    return rows


def cache_workload(model: str, src: list[str], seconds: float, pool: int) -> list[dict[str, Any]]:
    """Single sentences drawn from a pool of `pool`: cache off, then on."""
    sentences = src[:pool]
    bodies = [{"q": s, "source": "es", "target": "en"} for s in sentences]
    counts = [1] * len(bodies)
    rows = []
    for size in ("0", "10000"):
        env = {"NMT_CACHE_SIZE": size, "NMT_API_KEYS": None}
        with serve_in_subprocess(model, env) as (url, _):
            row = asyncio.run(closed_loop(url, bodies, counts, 8, seconds))
            text = httpx.get(f"{url}/metrics").text
            hits, misses = (
                metric(text, "nmt_cache_hits_total"),
                metric(text, "nmt_cache_misses_total"),
            )
            row.update(cache=size != "0", hit_rate=round(hits / max(hits + misses, 1), 3))
            print(json.dumps({"measure": "cache", **row}), flush=True)
            rows.append(row)
    return rows


def confidence_correlation(model: str, data: Path, n_test: int) -> dict[str, Any]:
    from sacrebleu.metrics import CHRF

    from nmt.translate import Translator, confidence, translate_corpus
    from nmt.validate import calibrate_confidence, spearman

    translator = Translator.load(model)
    dev_src = (data / "dev.es").read_text(encoding="utf-8").splitlines()
    dev_ref = (data / "dev.en").read_text(encoding="utf-8").splitlines()
    start = time.perf_counter()
    calibration = calibrate_confidence(translator, dev_src, dev_ref)
    src = (data / "test.es").read_text(encoding="utf-8").splitlines()[:n_test]
    refs = (data / "test.en").read_text(encoding="utf-8").splitlines()[:n_test]
    results: list[Any] = [None] * len(src)
    for i, r in translate_corpus(translator, src):
        results[i] = r
    chrf = CHRF()
    scores = [chrf.sentence_score(r.text, [ref]).score for r, ref in zip(results, refs)]
    calibrated = [confidence(r.features, calibration) for r in results]
    raw = [confidence(r.features, None) for r in results]
    ranked = sorted(zip(scores, calibrated))
    low, high = ranked[: len(ranked) // 2], ranked[len(ranked) // 2 :]
    row = {
        "dev_sentences": len(dev_src), "test_sentences": len(src),
        "spearman_calibrated": round(spearman(calibrated, scores), 3),
        "spearman_mean_token_prob": round(spearman(raw, scores), 3),
        "dev_spearman": calibration["dev_spearman"],
        "mean_confidence_top_half_chrf": round(sum(c for _, c in high) / len(high), 3),
        "mean_confidence_bottom_half_chrf": round(sum(c for _, c in low) / len(low), 3),
        "calibration": calibration, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    print(json.dumps({"measure": "confidence", **row}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/bible-es-en"))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pool", type=int, default=100, help="distinct sentences, cache workload")
    parser.add_argument("--test-sentences", type=int, default=500)
    parser.add_argument("--skip", default="", help="comma-separated: paragraphs,cache,confidence")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    src = (args.data / "test.es").read_text(encoding="utf-8").splitlines()
    if "paragraphs" not in skip:
        throughput(args.model, src, [int(c) for c in args.clients.split(",")], args.seconds)
    if "cache" not in skip:
        cache_workload(args.model, src, args.seconds, args.pool)
    if "confidence" not in skip:
        confidence_correlation(args.model, args.data, args.test_sentences)


if __name__ == "__main__":
    main()
