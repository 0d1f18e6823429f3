"""Load test of the REST service: throughput and latency at several concurrency levels, with and
without dynamic batching.

Starts `nmt serve` on a loopback port for each batching mode, runs closed-loop clients (each sends
a request, waits for the answer, sends the next) for a fixed time per concurrency level, and
prints one JSON line per (mode, concurrency) and a markdown table at the end.

    python -m benchmarks.serve_load --model runs/NAME/model
    python -m benchmarks.serve_load --model runs/NAME/model --concurrency 1,8 --seconds 3

The clients run on the same machine as the server, so at high concurrency they compete with it
for CPU; the numbers compare modes on one machine rather than measure a deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from serve.runner import serve_in_subprocess

# Spanish sentences of various lengths (the default models translate es -> en)
DEFAULT_SENTENCES = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y dijo Dios: Sea la luz; y fue la luz.",
    "Hola, ¿cómo estás?",
    "El perro duerme en la casa.",
    "Mañana iremos al mercado con nuestros amigos para comprar fruta y pan.",
    "No sé.",
    "La luna y el sol brillan sobre las aguas del mar.",
    "uno dos tres cuatro cinco seis siete ocho nueve diez",
    "Bienaventurados los pacíficos, porque ellos serán llamados hijos de Dios.",
    "gato",
    "Y el Verbo fue hecho carne, y habitó entre nosotros, lleno de gracia y de verdad.",
    "¿Dónde está la estación de tren?",
]


@dataclass
class LevelResult:
    batching: bool
    concurrency: int
    seconds: float
    requests: int
    errors: int
    requests_per_s: float
    sentences_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(int(q), 99) - 1]


@dataclass(frozen=True)
class Load:
    """Closed-loop clients against one server for a fixed time."""

    base_url: str
    concurrency: int
    seconds: float
    sentences: tuple[str, ...]
    texts_per_request: int = 1
    options: tuple[tuple[str, Any], ...] = ()  # decoding options sent with every request
    grace_s: float = 10.0  # after `seconds`, how long answers may still come
    first: int = 0  # where in `sentences` the first client starts


async def run_clients(load: Load) -> tuple[list[float], int, float]:
    """Runs the clients; returns (latencies in s of answered requests, errors, elapsed s).

    Each client has its own connection (one pool for hundreds of connections is slow in
    httpx). Requests still unanswered `grace_s` after the end are abandoned and count as errors.
    """
    latencies: list[float] = []
    errors = 0
    in_flight = 0
    stop_at = time.perf_counter() + load.seconds
    options = dict(load.options)
    n, k = len(load.sentences), load.texts_per_request

    async def client(c: int) -> None:
        nonlocal errors, in_flight
        i = load.first + c * k
        async with httpx.AsyncClient(base_url=load.base_url, timeout=120) as http:
            while time.perf_counter() < stop_at:
                texts = [load.sentences[(i + j) % n] for j in range(k)]
                i += k * load.concurrency
                start = time.perf_counter()
                in_flight += 1
                try:
                    r = await http.post("/v1/translate", json={"text": texts, **options})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                finally:
                    in_flight -= 1
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    start = time.perf_counter()
    try:
        clients = asyncio.gather(*(client(c) for c in range(load.concurrency)))
        await asyncio.wait_for(clients, load.seconds + load.grace_s)
    except TimeoutError:
        errors += in_flight  # abandoned; the server drops what they had queued
    return latencies, errors, min(time.perf_counter() - start, load.seconds + load.grace_s)


def _client_process(load: Load) -> tuple[list[float], int, float]:
    return asyncio.run(run_clients(load))


def run_level(load: Load, processes: int) -> tuple[list[float], int, float]:
    """`run_clients` with the clients spread over up to `processes` processes (one asyncio
    loop drives only so many connections), results merged."""
    procs = max(1, min(processes, load.concurrency))
    if procs == 1:
        return _client_process(load)
    shares = [load.concurrency // procs + (i < load.concurrency % procs) for i in range(procs)]
    starts = [sum(shares[:i]) * load.texts_per_request for i in range(procs)]
    loads = [
        replace(load, concurrency=share, first=load.first + start)
        for share, start in zip(shares, starts, strict=True)
    ]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_client_process, loads)
    latencies = [x for part in parts for x in part[0]]
    return latencies, sum(p[1] for p in parts), max(p[2] for p in parts)


def run_mode(args: argparse.Namespace, batching: bool, sentences: list[str]) -> list[LevelResult]:
    env: dict[str, str | None] = {
        "NMT_BATCHING": "true" if batching else "false",
        "NMT_BATCH_WAIT_MS": str(args.batch_wait_ms),
        "NMT_BATCH_TOKENS": str(args.batch_tokens),
        "NMT_MAX_QUEUE": "100000",
        "NMT_REQUEST_TIMEOUT_S": "120",
        "NMT_TORCH_THREADS": str(args.torch_threads),
        "NMT_CACHE_SIZE": "0",  # repeated sentences would come from the cache
        "NMT_API_KEYS": None,  # no auth, whatever the caller's environment says
        "NMT_API_KEYS_FILE": None,
    }
    options = (("beam_size", args.beam_size),) if args.beam_size else ()
    results = []
    with serve_in_subprocess(args.model, env=env, log_path=args.server_log) as (url, _):
        # one short round first, so that one-off kernel setup is not measured
        run_level(Load(url, 4, args.warmup_seconds, tuple(sentences), 1, options), 1)
        for c in args.concurrency:
            load = Load(
                url, c, args.seconds, tuple(sentences), args.texts_per_request, options,
                args.grace_seconds,
            )  # fmt: skip
            lat, errors, elapsed = run_level(load, args.client_processes)
            ms = [x * 1000 for x in lat]
            result = LevelResult(
                batching=batching,
                concurrency=c,
                seconds=round(elapsed, 2),
                requests=len(lat),
                errors=errors,
                requests_per_s=round(len(lat) / elapsed, 2),
                sentences_per_s=round(len(lat) * args.texts_per_request / elapsed, 2),
                p50_ms=round(percentile(ms, 50), 1),
                p95_ms=round(percentile(ms, 95), 1),
                p99_ms=round(percentile(ms, 99), 1),
            )
            print(json.dumps(asdict(result)), flush=True)
            results.append(result)
    return results


def markdown_table(results: list[LevelResult]) -> str:
    lines = [
        "| batching | concurrency | requests/s | sentences/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {'on' if r.batching else 'off'} | {r.concurrency} | {r.requests_per_s:.1f} | "
            f"{r.sentences_per_s:.1f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | "
            f"{r.errors} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=8.0, help="load time per concurrency level")
    p.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="after the load time, how long answers may still come (then: errors)",
    )
    p.add_argument("--warmup-seconds", type=float, default=5.0)
    p.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--beam-size", type=int, default=None, help="default: the model's")
    p.add_argument(
        "--batch-tokens", type=int, default=16384, help="work per batch: source x texts x beams"
    )
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="processes the clients are spread over (default 4)",
    )
    p.add_argument("--torch-threads", type=int, default=0, help="server's CPU threads (0: default)")
    p.add_argument("--input", type=Path, default=None, help="sentences, one per line")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    p.add_argument("--server-log", type=Path, default=None, help="server output (default: dropped)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        p.error("--modes takes on, off or on,off")
    args.modes = [m == "on" for m in modes]
    if any(c < 1 for c in args.concurrency) or args.seconds <= 0:
        p.error("concurrency levels and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sentences = DEFAULT_SENTENCES
    if args.input is not None:
        sentences = [s.strip() for s in args.input.read_text("utf-8").splitlines() if s.strip()]
    level_s = args.seconds + args.grace_seconds
    budget_s = len(args.modes) * (len(args.concurrency) * level_s + args.warmup_seconds)
    print(f"# load test of {args.model}: at most {budget_s:.0f} s of load", file=sys.stderr)
    results: list[LevelResult] = []
    for batching in args.modes:
        results += run_mode(args, batching, sentences)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in results), "utf-8")
    print()
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
