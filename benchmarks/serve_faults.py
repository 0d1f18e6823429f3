"""The service under a burst and beside a worst-case request: nothing lost, small requests still fast.

Starts `nmt serve` on a loopback port with the given model and measures:

1. **Burst.** N requests (default 1,000) sent at once, each on its own connection. Every one must
   be answered 200, 429 or 503 with Retry-After; anything else (a connection error, a timeout,
   a 5xx, a 503 without Retry-After) counts as lost.
2. **Worst case beside small requests.** Small requests (one short sentence, the model's beam)
   from a few closed-loop clients, first alone, then while other clients keep sending the
   worst request the limits allow (the longest text, the biggest beam, alignments on, as many
   texts as alignments allow). Reports p50/p99 of the small requests in both phases and the
   worst requests' latency.

    python -m benchmarks.serve_faults --model runs/NAME/model
    python -m benchmarks.serve_faults --model runs/NAME/model --burst 200 --seconds 10

Clients share the machine with the server, so they compete with it for CPU; compare the two
phases of one run rather than figures from different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve_load import DEFAULT_SENTENCES, percentile
from serve.runner import serve_in_subprocess

SMALL = "¿Dónde está la estación de tren?"
# a long verse, repeated to reach the subword limit (the server's own limit decides)
LONG_UNIT = (
    "Y el Verbo fue hecho carne, y habitó entre nosotros, y vimos su gloria, gloria como "
    "del unigénito del Padre, lleno de gracia y de verdad. "
)


@dataclass
class BurstResult:
    requests: int
    answered_200: int
    answered_429: int
    answered_503_with_retry_after: int
    lost: int
    lost_reasons: dict[str, int]
    seconds: float


@dataclass
class PhaseResult:
    phase: str
    small_requests: int
    small_p50_ms: float
    small_p99_ms: float
    small_max_ms: float
    small_errors: int
    worst_requests: int
    worst_p50_ms: float
    worst_errors: int


async def burst(url: str, n: int, timeout_s: float) -> BurstResult:
    """n requests at once, each on its own connection; counts how each was answered."""
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        text = DEFAULT_SENTENCES[i % len(DEFAULT_SENTENCES)]
        try:
            async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
                r = await client.post("/v1/translate", json={"text": text})
        except httpx.HTTPError as err:
            outcomes[f"lost: {type(err).__name__}"] += 1
            return
        if r.status_code in (200, 429):
            outcomes[str(r.status_code)] += 1
        elif r.status_code == 503 and r.headers.get("Retry-After"):
            outcomes["503"] += 1
        else:
            outcomes[f"lost: HTTP {r.status_code}"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    lost = {k: v for k, v in outcomes.items() if k.startswith("lost")}
    return BurstResult(
        requests=n,
        answered_200=outcomes["200"],
        answered_429=outcomes["429"],
        answered_503_with_retry_after=outcomes["503"],
        lost=sum(lost.values()),
        lost_reasons=lost,
        seconds=round(time.perf_counter() - start, 2),
    )


async def closed_loop(
    url: str, body: dict[str, Any], clients: int, stop_at: float
) -> tuple[list[float], int]:
    """Clients that each send `body`, wait, and send again until stop_at; (latencies, errors)."""
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/translate", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors


def worst_body(limits: dict[str, Any]) -> dict[str, Any]:
    """The most work one request may ask for under the server's limits."""
    text = (LONG_UNIT * 40)[: limits["max_chars"]]
    return {
        "text": [text] * min(limits["max_texts"], limits["max_alignment_texts"]),
        "beam_size": limits["max_beam_size"],
        "n_best": limits["max_beam_size"],
        "return_alignments": True,
    }


def fit_to_subword_limit(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Shortens the worst text until the server accepts it (its subword limit)."""
    text = body["text"][0]
    with httpx.Client(base_url=url, timeout=600) as client:
        while True:
            probe = {**body, "text": [text], "beam_size": 1, "n_best": 1}
            probe["return_alignments"] = False
            r = client.post("/v1/translate", json=probe)
            if r.status_code == 200 or len(text) < 20:
                return {**body, "text": [text] * len(body["text"])}
            text = text[: int(len(text) * 0.9)]


async def phase(
    url: str, name: str, seconds: float, small_clients: int, worst: dict[str, Any] | None
) -> PhaseResult:
    stop_at = time.perf_counter() + seconds
    small_task = closed_loop(url, {"text": SMALL}, small_clients, stop_at)
    if worst is None:
        (small, small_err), (big, big_err) = await small_task, ([], 0)
    else:
        (small, small_err), (big, big_err) = await asyncio.gather(
            small_task, closed_loop(url, worst, 1, stop_at)
        )
    ms = [x * 1000 for x in small]
    return PhaseResult(
        phase=name,
        small_requests=len(small),
        small_p50_ms=round(percentile(ms, 50), 1),
        small_p99_ms=round(percentile(ms, 99), 1),
        small_max_ms=round(max(ms, default=0.0), 1),
        small_errors=small_err,
        worst_requests=len(big),
        worst_p50_ms=round(percentile([x * 1000 for x in big], 50), 1),
        worst_errors=big_err,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--burst", type=int, default=1000, help="requests sent at once")
    p.add_argument("--burst-timeout", type=float, default=300.0, help="client timeout, s")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each latency phase")
    p.add_argument("--small-clients", type=int, default=4)
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="the server's NMT_BATCH_TOKENS (default: its own)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=None, help="the server's NMT_REQUEST_TIMEOUT_S"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    p.add_argument("--server-log", type=Path, default=None, help="server output (default: dropped)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # no auth; no cache: the workload repeats sentences, which would come from the cache
    env: dict[str, str | None] = {
        "NMT_API_KEYS": None,
        "NMT_API_KEYS_FILE": None,
        "NMT_CACHE_SIZE": "0",
    }
    if args.batch_tokens is not None:
        env["NMT_BATCH_TOKENS"] = str(args.batch_tokens)
    if args.request_timeout is not None:
        env["NMT_REQUEST_TIMEOUT_S"] = str(args.request_timeout)
    rows: list[dict[str, Any]] = []
    with serve_in_subprocess(args.model, env=env, log_path=args.server_log) as (url, _):
        limits = httpx.get(f"{url}/v1/model", timeout=30).json()["limits"]
        result = asyncio.run(burst(url, args.burst, args.burst_timeout))
        rows.append({"test": "burst", **asdict(result)})
        print(json.dumps(rows[-1]), flush=True)
        worst = fit_to_subword_limit(url, worst_body(limits))
        print(
            f"# worst request: {len(worst['text'])} texts of {len(worst['text'][0])} chars, "
            f"beam {worst['beam_size']}, alignments on",
            file=sys.stderr,
        )
        for name, body in (("small alone", None), ("beside worst case", worst)):
            r = asyncio.run(phase(url, name, args.seconds, args.small_clients, body))
            rows.append({"test": "latency", **asdict(r)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    b = rows[0]
    print()
    print("| burst | 200 | 429 | 503 + Retry-After | lost | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {b['requests']} | {b['answered_200']} | {b['answered_429']} | "
        f"{b['answered_503_with_retry_after']} | {b['lost']} | {b['seconds']} |"
    )
    print()
    print("| phase | small requests | p50 ms | p99 ms | max ms | worst requests | worst p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        print(
            f"| {r['phase']} | {r['small_requests']} | {r['small_p50_ms']:.0f} | "
            f"{r['small_p99_ms']:.0f} | {r['small_max_ms']:.0f} | {r['worst_requests']} | "
            f"{r['worst_p50_ms']:.0f} |"
        )
    return 0 if b["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
