"""Dynamic batching over real HTTP: concurrent clients, batch independence, overload, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from nmt.search import SearchOptions
from nmt.translate import TranslationResult, Translator
from serve.app import create_app
from serve.batcher import Batcher, ShuttingDownError
from serve.metrics import Metrics
from serve.runner import serve_in_thread
from serve.settings import settings_from

TEXTS = [
    "El gato come pan hoy.",
    "Agua.",
    "La mujer busca un libro y la niña ve la luna mañana.",
    "Mi amigo tiene flores.",
    "El perro.",
    "El hombre quiere una casa ahora.",
    "La niña ve pan.",
    "Hoy hoy hoy.",
]


class Recording:
    """The real translator, recording each batch it is given and optionally slowed down."""

    def __init__(self, inner: Translator, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.cfg = inner.cfg
        self.delay_s = delay_s
        self.calls: list[tuple[list[str], SearchOptions]] = []
        self.lock = threading.Lock()

    @property
    def options(self) -> SearchOptions:
        return self.inner.options

    def translate(
        self, texts: list[str], options: SearchOptions | None = None, **kw: Any
    ) -> list[TranslationResult]:
        with self.lock:
            self.calls.append((list(texts), options or self.inner.options))
        time.sleep(self.delay_s)
        return self.inner.translate(texts, options, **kw)

    def translate_stream(self, text: str, *args: Any, **kw: Any) -> TranslationResult:
        return self.inner.translate_stream(text, *args, **kw)

    def info(self) -> dict[str, Any]:
        return self.inner.info()


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


async def post_all(base_url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """All requests at once, each from its own connection, like independent clients."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/translate", json=b) for b in bodies)))


def test_a_text_translates_the_same_alone_and_amid_concurrent_traffic(
    translator: Translator,
) -> None:
    recording = Recording(translator)
    app = create_app(settings_from(batch_wait_ms=100, warmup=False), translator=recording)
    target = {
        "text": "El perro tiene agua.",
        "beam_size": 3,
        "n_best": 2,
        "return_alignments": True,
    }
    with serve_in_thread(app) as url:
        alone = httpx.post(f"{url}/v1/translate", json=target, timeout=60).json()
        others = [
            {"text": t, "beam_size": 3, "n_best": 2, "return_alignments": True} for t in TEXTS
        ]
        bodies: list[dict[str, Any]] = others[:4] + [target] + others[4:] + [target]
        responses = asyncio.run(post_all(url, bodies))
        metrics = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * len(bodies)
    batch_sizes = [len(texts) for texts, _ in recording.calls[1:]]
    assert max(batch_sizes) > 1, batch_sizes  # requests really were translated together
    assert len(recording.calls) - 1 < len(bodies)
    expected = alone["translations"][0]
    for r in (responses[4], responses[-1]):
        got = r.json()["translations"][0]
        assert got["text"] == expected["text"]
        assert [h["text"] for h in got["n_best"]] == [h["text"] for h in expected["n_best"]]
        assert got["score"] == pytest.approx(expected["score"], abs=1e-4)
        assert got["alignment"]["tgt_tokens"] == expected["alignment"]["tgt_tokens"]
        rows = zip(got["alignment"]["attention"], expected["alignment"]["attention"], strict=True)
        for row, row_alone in rows:
            assert row == pytest.approx(row_alone, abs=1e-4)
    for body, r in zip(
        bodies, responses, strict=True
    ):  # and every client got its own text's translation
        solo = translator.translate([body["text"]], translator.with_options(beam_size=3, n_best=2))[
            0
        ]
        assert r.json()["translations"][0]["text"] == solo.text
    assert "nmt_batch_size_texts_count" in metrics


def test_each_batch_has_one_option_set_and_every_request_its_own_options(
    translator: Translator,
) -> None:
    recording = Recording(translator)
    app = create_app(settings_from(batch_wait_ms=100, warmup=False), translator=recording)
    options = [{"beam_size": 1}, {"beam_size": 3, "n_best": 2}, {"beam_size": 2, "max_length": 2}]
    bodies: list[dict[str, Any]] = [{"text": t, **options[i % 3]} for i, t in enumerate(TEXTS * 2)]
    with serve_in_thread(app) as url:
        responses = asyncio.run(post_all(url, bodies))

    def key(opts: dict[str, Any]) -> tuple[Any, ...]:
        return opts["beam_size"], opts.get("n_best", 1), opts.get("max_length")

    def key_of(o: SearchOptions) -> tuple[Any, ...]:
        return o.beam_size, o.n_best, int(o.max_len_b) if o.max_len_a == 0 else None

    asked: dict[str, set[tuple[Any, ...]]] = {}
    for body in bodies:
        asked.setdefault(body["text"], set()).add(key(body))
    assert len(recording.calls) < len(bodies)
    for texts, opts in recording.calls:
        assert all(key_of(opts) in asked[t] for t in texts), (texts, opts)
    for body, r in zip(bodies, responses, strict=True):
        changes = {k: v for k, v in body.items() if k in ("beam_size", "n_best")}
        if "max_length" in body:
            changes.update(max_len_a=0.0, max_len_b=body["max_length"])
        solo = translator.translate([body["text"]], translator.with_options(**changes))[0]
        got = r.json()["translations"][0]
        assert got["text"] == solo.text
        assert len(got["n_best"]) == body.get("n_best", 1)


def test_without_batching_each_model_call_serves_one_request(translator: Translator) -> None:
    recording = Recording(translator)
    app = create_app(settings_from(batching=False, warmup=False), translator=recording)
    bodies = [{"text": [t, t + " Hoy."]} for t in TEXTS]
    with serve_in_thread(app) as url:
        responses = asyncio.run(post_all(url, bodies))
        info = httpx.get(f"{url}/v1/model").json()
    assert info["batching"] is False
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert sorted(tuple(texts) for texts, _ in recording.calls) == sorted(
        tuple(b["text"]) for b in bodies
    )


def test_overload_answers_503_with_retry_after_and_every_request_is_answered(
    translator: Translator,
) -> None:
    slow = Recording(translator, delay_s=0.2)
    settings = settings_from(
        batching=False, max_queue=3, max_texts=2, retry_after_s=2, warmup=False
    )
    app = create_app(settings, translator=slow)
    n = 24
    bodies = [{"text": TEXTS[i % len(TEXTS)]} for i in range(n)]
    with serve_in_thread(app) as url:
        responses = asyncio.run(post_all(url, bodies))
        assert httpx.get(f"{url}/v1/ready").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert len(responses) == n
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}, codes
    for r in responses:
        assert r.headers["X-Request-ID"]
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "2"
            assert r.json()["error"]["code"] == "overloaded"
            assert "queue is full" in r.json()["error"]["message"]
        else:
            assert r.json()["translations"][0]["text"]
    assert len(slow.calls) == codes.count(200)
    assert 'nmt_rejected_requests_total{reason="queue_full"}' in metrics


def test_a_request_over_the_timeout_gets_504_and_the_server_carries_on(
    translator: Translator,
) -> None:
    slow = Recording(translator, delay_s=0.6)
    app = create_app(settings_from(request_timeout_s=0.2, warmup=False), translator=slow)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/translate", json={"text": "Pan."})
        assert r.status_code == 504
        assert r.json()["error"] == {
            "status": 504,
            "code": "timeout",
            "message": "translation did not finish within the request timeout of 0.2 s",
            "request_id": r.headers["X-Request-ID"],
            "details": [],
        }
        r = client.post("/v1/translate/stream", json={"text": ["Pan.", "Agua."]})
        assert r.status_code == 200
        assert r.text.startswith("event: error\n") and '"code": "timeout"' in r.text
        slow.delay_s = 0.0
        time.sleep(0.7)  # the worker finishes the abandoned batch
        assert client.post("/v1/translate", json={"text": "Pan."}).status_code == 200


def test_batches_respect_the_padded_token_budget(translator: Translator) -> None:
    recording = Recording(translator)
    # the longest text fits alone; only shorter ones can share a batch
    budget = max(len(ids) for ids in translator.tokenizer.encode_src(TEXTS)) + 1
    settings = settings_from(batch_tokens=budget, batch_wait_ms=100, warmup=False)
    app = create_app(settings, translator=recording)
    # greedy, so that the work of a batch is its padded tokens (beams multiply it)
    bodies: list[dict[str, Any]] = [{"text": t, "beam_size": 1} for t in TEXTS * 2]
    with serve_in_thread(app) as url:
        responses = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert any(len(texts) > 1 for texts, _ in recording.calls)
    for texts, _ in recording.calls:
        lengths = [len(ids) for ids in translator.tokenizer.encode_src(texts)]
        assert len(texts) == 1 or max(lengths) * len(texts) <= budget, (texts, lengths)


def test_stopping_answers_every_queued_request(translator: Translator) -> None:
    slow = Recording(translator, delay_s=0.3)
    batcher = Batcher(lambda: slow, metrics=Metrics(), batching=False)
    batcher.start()
    assert batcher.wait_ready(30)

    async def scenario() -> list[Any]:
        options = translator.with_options(beam_size=1)
        tasks = [asyncio.create_task(batcher.translate([t], options, 30)) for t in TEXTS[:5]]
        await asyncio.sleep(0.1)  # the first is being translated, the rest wait in the queue
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stopper.join(30)
        return results

    results = asyncio.run(scenario())
    assert (
        results[0][0].text
        == translator.translate([TEXTS[0]], translator.with_options(beam_size=1))[0].text
    )
    assert all(isinstance(r, ShuttingDownError) for r in results[1:]), results
    assert batcher.queue_depth == 0


def test_a_client_that_hangs_up_has_its_texts_dropped_from_the_queue(
    translator: Translator,
) -> None:
    slow = Recording(translator, delay_s=0.8)
    app = create_app(settings_from(batching=False, warmup=False), translator=slow)

    async def scenario(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            busy = asyncio.create_task(client.post("/v1/translate", json={"text": "Pan."}))
            await asyncio.sleep(0.2)  # the worker is busy with "Pan."; the next text waits
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/translate", json={"text": "Agua."}, timeout=0.2)
            return (await busy).status_code

    with serve_in_thread(app) as url:
        assert asyncio.run(scenario(url)) == 200
        time.sleep(1.0)  # long enough for the worker to have taken "Agua." had it stayed
        metrics = httpx.get(f"{url}/metrics").text
    assert [texts for texts, _ in slow.calls] == [["Pan."]]
    assert 'route="/v1/translate",status="499"' in metrics
