"""Simultaneous translation: the quality/latency curve of wait-k, and the live endpoint's latency.

1. **Curve** (`curve`): for each model, BLEU of full-sentence greedy decoding, then for each k the
   source revealed one word at a time to a wait-k policy (`nmt.simultaneous.simulate`, what
   `nmt evaluate --wait-k K` runs): BLEU with Average Lagging, Average Proportion and
   Differentiable Average Lagging (SimulEval's definitions, in source words). Models whose encoder
   looks ahead get the full-sentence row only; a model trained at one k (a per-k model) is
   decoded at that k only.
2. **Live** (`live`): `nmt serve` with a uni model and C concurrent WebSocket clients, each typing
   test sentences word by word (one word every --word-ms) on /v1/translate/live. For every
   release of target words, the time from sending the frame that released them (the `frame`
   field of the words frame) to receiving them: median, p99 and max, per release. The clients
   start together and type in step (every word a burst of C frames, the worst case), or with
   --stagger spread over one word interval, as independent typists would.

    python -m benchmarks.simultaneous curve --model runs/uni/model --model runs/waitk/model \
        --k 1 3 5 7 --sentences 300
    python -m benchmarks.simultaneous offline --model runs/waitk/model --k 1 3 5 7
    python -m benchmarks.simultaneous live --model runs/waitk/model --clients 8 --k 3

Clients share the machine with the server in `live`, so they compete with it for CPU. A wait-k
step is a handful of small products, so both parts run torch on --threads threads (default 1):
on a busy machine, more threads spend longer waiting for each other than computing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.serve_load import percentile
from serve.runner import serve_in_subprocess

TEST_SRC = Path("data/bible-es-en/test.es")
TEST_REF = Path("data/bible-es-en/test.en")


def _lines(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    return lines[:n] if n > 0 else lines


def curve(models: list[Path], ks: list[int], n: int, beam: int) -> list[dict[str, Any]]:
    """The rows of the quality/latency table (one per model and decoding)."""
    from dataclasses import replace

    from nmt.metrics import score_files_text
    from nmt.simultaneous import check_streaming_model, corpus_latency, simulate
    from nmt.translate import Translator, translate_corpus

    src, ref = _lines(TEST_SRC, n), _lines(TEST_REF, n)
    ref_lengths = [len(r.split()) for r in ref]
    rows: list[dict[str, Any]] = []
    for model_dir in models:
        translator = Translator.load(model_dir)
        name = translator.cfg.name
        for beam_size in sorted({1, beam}):
            options = replace(translator.options, beam_size=beam_size, n_best=1)
            start = time.perf_counter()
            hyps = [""] * len(src)
            for i, r in translate_corpus(translator, src, options):
                hyps[i] = r.text
            bleu = score_files_text(hyps, [ref], bootstrap=0)["bleu"]["score"]
            rows.append({"model": name, "model_dir": str(model_dir), "decoding": f"full sentence, beam {beam_size}",
                         "bleu": round(bleu, 2), "sentences": len(src),
                         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        try:
            check_streaming_model(translator.model)
        except ValueError:
            continue
        trained_k = translator.cfg.train.wait_k
        # a model trained at one k is decoded at that k only (a per-k model); others at every k
        for k in [k for k in ks if not isinstance(trained_k, int) or k == trained_k]:
            start = time.perf_counter()
            sims = [simulate(translator, line, k) for line in src]
            bleu = score_files_text([s.text for s in sims], [ref], bootstrap=0)["bleu"]["score"]
            lat = corpus_latency([s.delays for s in sims], [s.source_length for s in sims],
                                 ref_lengths)  # fmt: skip
            rows.append({"model": name, "model_dir": str(model_dir), "decoding": f"wait-{k}", "bleu": round(bleu, 2),
                         "al": round(lat.al, 2), "ap": round(lat.ap, 3), "dal": round(lat.dal, 2),
                         "sentences": len(src),
                         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def offline(models: list[Path], ks: list[int], n: int, precision: str = "fp32"
            ) -> list[dict[str, Any]]:  # fmt: skip
    """Wait-k BLEU of whole test sentences decoded offline (`nmt.simultaneous.wait_k_texts`,
    the same output as the live policy, without the latency bookkeeping): fast enough for the
    whole test set. A per-k model is decoded at its own k only, as in `curve`. `precision`:
    bf16 decodes with the live route's bf16 model copy (`NMT_LIVE_PRECISION=bf16`)."""
    from nmt.metrics import score_files_text
    from nmt.simultaneous import live_translator, wait_k_texts
    from nmt.translate import Translator

    src, ref = _lines(TEST_SRC, n), _lines(TEST_REF, n)
    rows: list[dict[str, Any]] = []
    for model_dir in models:
        translator = live_translator(Translator.load(model_dir), precision)
        ids = translator.tokenizer.encode_src(src)
        trained_k = translator.cfg.train.wait_k
        for k in [k for k in ks if not isinstance(trained_k, int) or k == trained_k]:
            start = time.perf_counter()
            hyps = wait_k_texts(translator, ids, k)
            bleu = score_files_text(hyps, [ref], bootstrap=0)["bleu"]["score"]
            rows.append({"model": translator.cfg.name, "model_dir": str(model_dir),
                         "decoding": f"wait-{k}, offline", "precision": precision,
                         "bleu": round(bleu, 2),
                         "sentences": len(src),
                         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


async def _client(url: str, sentences: list[str], k: int, word_s: float, delay_s: float = 0.0
                  ) -> list[tuple[float, bool]]:  # fmt: skip
    """Types the sentences word by word, starting after delay_s; returns the latency of every
    release (seconds) and whether the end-of-sentence frame released it (the flush) rather
    than a source word."""
    from websockets.asyncio.client import connect

    await asyncio.sleep(delay_s)
    latencies: list[tuple[float, bool]] = []
    ends: set[int] = set()  # frame numbers of the end frames
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "k": k}))
        assert json.loads(await ws.recv())["type"] == "ready"
        sent: dict[int, float] = {}  # client frame number -> when it was sent
        frame_no = 1

        async def receive(sentences_left: int) -> None:
            while sentences_left:
                frame = json.loads(await ws.recv())
                if frame["type"] == "words":
                    number = frame["frame"]
                    latencies.append((time.perf_counter() - sent[number], number in ends))
                elif frame["type"] == "done":
                    sentences_left -= 1
                elif frame["type"] == "error":
                    raise RuntimeError(frame["error"])

        receiver = asyncio.create_task(receive(len(sentences)))
        for sentence in sentences:
            for word in sentence.split():
                frame_no += 1
                sent[frame_no] = time.perf_counter()
                await ws.send(json.dumps({"type": "text", "text": word + " "}))
                await asyncio.sleep(word_s)
            frame_no += 1
            ends.add(frame_no)
            sent[frame_no] = time.perf_counter()
            await ws.send(json.dumps({"type": "end"}))
        await receiver
    return latencies


async def _live_run(url: str, clients: int, per_client: int, k: int, word_s: float,
                    stagger: bool = False) -> tuple[list[tuple[float, bool]], float]:  # fmt: skip
    """`stagger`: client c starts c/clients of a word interval after the first, as independent
    typists would; else all start at once and type in step (every word a burst of C frames)."""
    sentences = _lines(TEST_SRC, clients * per_client)
    start = time.perf_counter()
    results = await asyncio.gather(*(
        _client(url, sentences[c * per_client : (c + 1) * per_client], k, word_s,
                word_s * c / clients if stagger else 0.0)
        for c in range(clients)
    ))  # fmt: skip
    return [x for r in results for x in r], time.perf_counter() - start


def live(model: Path, clients: int, per_client: int, k: int, word_ms: float, threads: int,
         stagger: bool = False, drafts: bool = True, precision: str = "fp32"
         ) -> dict[str, Any]:  # fmt: skip
    """Release latency of the live route with `clients` concurrent typists (see `_live_run`
    for `stagger`); `drafts`: the server writes sentence ends ahead (`NMT_LIVE_DRAFTS`);
    `precision`: of the live route's model copy (`NMT_LIVE_PRECISION`)."""
    env = {"NMT_WARMUP": "true", "NMT_TORCH_THREADS": str(threads),
           "NMT_LIVE_DRAFTS": str(drafts).lower(), "NMT_LIVE_PRECISION": precision}  # fmt: skip
    with serve_in_subprocess(model, env=env) as (base, _):
        url = base.replace("http://", "ws://") + "/v1/translate/live"
        asyncio.run(_live_run(url, 1, 1, k, word_ms / 1000))  # warm the live thread's kernels
        latencies, seconds = asyncio.run(
            _live_run(url, clients, per_client, k, word_ms / 1000, stagger)
        )
    row: dict[str, Any] = {"clients": clients, "sentences": clients * per_client, "k": k,
                           "word_ms": word_ms, "threads": threads, "stagger": stagger,
                           "drafts": drafts, "precision": precision}  # fmt: skip
    for name, keep in (("all", (False, True)), ("on_words", (False,)), ("on_end", (True,))):
        ms = sorted(x * 1000 for x, at_end in latencies if at_end in keep)
        if ms:
            row[name] = {"releases": len(ms), "median_ms": round(statistics.median(ms), 1),
                         "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(ms[-1], 1)}  # fmt: skip
    row["seconds"] = round(seconds, 1)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("curve", help="BLEU and latency per k, per model")
    p.add_argument("--model", type=Path, action="append", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--sentences", type=int, default=300, help="first N test sentences (0: all)")
    p.add_argument("--beam", type=int, default=5, help="also decode full sentences with this beam")
    p = sub.add_parser("offline", help="wait-k BLEU of whole sentences decoded offline")
    p.add_argument("--model", type=Path, action="append", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--sentences", type=int, default=0, help="first N test sentences (0: all)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the live route's bf16 model copy (NMT_LIVE_PRECISION=bf16)")  # fmt: skip
    p = sub.add_parser("live", help="release latency of /v1/translate/live")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sentences-per-client", type=int, default=5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--word-ms", type=float, default=300.0, help="time between typed words")
    p.add_argument("--stagger", action="store_true",
                   help="start the clients spread over one word interval (independent typists) "
                        "instead of all at once, typing in step")  # fmt: skip
    p.add_argument("--drafts", choices=["on", "off", "both"], default="on",
                   help="the server writes sentence ends ahead while idle (NMT_LIVE_DRAFTS); "
                        "both: one run with, then one without")  # fmt: skip
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="of the live route's model copy (NMT_LIVE_PRECISION); several: one run "
                        "each")  # fmt: skip
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=None, help="append the rows here (JSON lines)")
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.what == "curve":
        import torch

        torch.set_num_threads(args.threads)
        rows = curve(args.model, args.k, args.sentences, args.beam)
    elif args.what == "offline":
        import torch

        torch.set_num_threads(args.threads)
        rows = offline(args.model, args.k, args.sentences, args.precision)
    else:
        drafts = {"on": [True], "off": [False], "both": [True, False]}[args.drafts]
        rows = [live(args.model, args.clients, args.sentences_per_client, args.k, args.word_ms,
                     args.threads, args.stagger, on, precision)
                for precision in args.precision for on in drafts]  # fmt: skip
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
