"""The service under faults and hostile input: a supervised worker, bounded work per request,
auth that fails closed, connection limits, invisible text and non-finite numbers."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from test_serve_batching import TEXTS, Recording, post_all

from nmt.search import SearchCancelledError
from nmt.translate import TranslationResult, Translator
from serve.app import create_app
from serve.batcher import Batcher, TranslationFailedError
from serve.metrics import Metrics
from serve.runner import serve_in_thread
from serve.settings import Settings, settings_from


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


class Faulty:
    """The real translator, except that a text containing `poison` raises `error` (in the
    tokenizer or in translation), and results can be spoiled with non-finite numbers."""

    def __init__(self, inner: Translator, error: BaseException, where: str = "translate") -> None:
        self.inner = inner
        self.cfg = inner.cfg
        self.error = error
        self.where = where
        self.poison = "POISON"
        self.calls = 0
        self.spoil = False
        outer = self

        class Tokenizer:
            def encode_src(self, texts: list[str]) -> list[list[int]]:
                if outer.where == "tokenizer" and any(outer.poison in t for t in texts):
                    raise outer.error
                return inner.tokenizer.encode_src(texts)

        self.tokenizer = Tokenizer()
        self.options = inner.options

    def translate(self, texts: list[str], *args: Any, **kw: Any) -> list[TranslationResult]:
        self.calls += 1
        if self.where == "translate" and any(self.poison in t for t in texts):
            raise self.error
        results = self.inner.translate(texts, *args, **kw)
        if self.spoil:
            for r in results:
                r.score = math.inf
                r.n_best = [(t, math.nan) for t, _ in r.n_best]
                if r.attention:
                    r.attention[0][0] = math.nan
                    r.attention[-1][-1] = -math.inf
        return results

    def translate_stream(self, text: str, *args: Any, **kw: Any) -> TranslationResult:
        return self.inner.translate_stream(text, *args, **kw)

    def info(self) -> dict[str, Any]:
        return self.inner.info()


@contextmanager
def running(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        yield client


# -- 1. a supervised worker -------------------------------------------------------------------


def test_an_error_in_one_batch_is_a_500_for_that_request_only(translator: Translator) -> None:
    faulty = Faulty(translator, RuntimeError("secret internals /home/x"))
    app = create_app(settings_from(warmup=False), translator=faulty)
    with running(app) as c:
        r = c.post("/v1/translate", json={"text": "POISON pan."}, headers={"X-Request-ID": "r-1"})
        assert r.status_code == 500
        error = r.json()["error"]
        assert (error["code"], error["request_id"]) == ("translation_failed", "r-1")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert c.get("/v1/ready").status_code == 200
        assert c.post("/v1/translate", json={"text": "Pan."}).status_code == 200


def test_a_tokenizer_failure_while_collecting_fails_that_job_and_the_worker_goes_on(
    translator: Translator,
) -> None:
    """The worker counts subwords itself for jobs queued without counts (the path where a
    tokenizer error used to end the worker thread)."""
    faulty = Faulty(translator, ValueError("bad text"), where="tokenizer")
    batcher = Batcher(lambda: faulty, metrics=Metrics())
    batcher.start()
    assert batcher.wait_ready(30)

    async def scenario() -> tuple[Any, Any]:
        options = translator.with_options(beam_size=1)
        bad = asyncio.create_task(batcher.translate(["POISON"], options, 30))
        good = asyncio.create_task(batcher.translate(["Pan."], options, 30))
        return tuple(await asyncio.gather(bad, good, return_exceptions=True))  # type: ignore[return-value]

    try:
        bad, good = asyncio.run(scenario())
        assert isinstance(bad, TranslationFailedError)
        assert (
            good[0].text
            == translator.translate(["Pan."], translator.with_options(beam_size=1))[0].text
        )
        assert batcher.ready and batcher.restarts == 0
    finally:
        batcher.stop()


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)], ids=repr)
def test_a_base_exception_restarts_the_worker_and_readiness_tells_the_truth(
    translator: Translator, error: BaseException
) -> None:
    faulty = Faulty(translator, error)
    app = create_app(settings_from(warmup=False, restart_delay_s=1.0), translator=faulty)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/translate", json={"text": "POISON."})
        assert (r.status_code, r.json()["error"]["code"]) == (500, "translation_failed")
        ready = client.get("/v1/ready")  # within the restart delay
        assert (ready.status_code, ready.json()["status"]) == (503, "restarting")
        refused = client.post("/v1/translate", json={"text": "Pan."})
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "not_ready")
        assert refused.headers["Retry-After"]
        assert app.state.batcher.wait_ready(10)
        assert client.get("/v1/ready").status_code == 200
        assert client.post("/v1/translate", json={"text": "Pan."}).status_code == 200
        assert "nmt_worker_restarts_total 1.0" in client.get("/metrics").text


def test_a_dead_worker_thread_is_replaced(translator: Translator) -> None:
    batcher = Batcher(lambda: translator, metrics=Metrics())
    batcher.start()
    assert batcher.wait_ready(30)
    # the supervisor catches everything, so stand in a thread that has ended
    with batcher._cond:
        batcher._stopping = True
        batcher._cond.notify_all()
    assert batcher._thread is not None
    batcher._thread.join(10)
    batcher._stopping = False
    assert not batcher.ready  # noticed: a replacement starts
    assert batcher.wait_ready(10) and batcher.restarts == 1

    async def one() -> Any:
        return await batcher.translate(["Pan."], translator.with_options(beam_size=1), 30)

    try:
        assert asyncio.run(one())[0].text
    finally:
        batcher.stop()


# -- 2. bounded work ----------------------------------------------------------------------------


def test_output_length_is_capped_even_when_the_request_does_not_ask(
    translator: Translator,
) -> None:
    app = create_app(settings_from(warmup=False, max_output_length=2), translator=translator)
    long_text = "El gato come pan hoy y la mujer busca un libro mañana."
    with running(app) as c:
        for path in ("/v1/translate", "/v1/translate/stream"):
            r = c.post(path, json={"text": long_text, "beam_size": 1, "return_alignments": True})
            assert r.status_code == 200
        t = c.post("/v1/translate", json={"text": long_text, "return_alignments": True}).json()
        tgt = t["translations"][0]["alignment"]["tgt_tokens"]
        assert len(tgt) <= 3  # two subwords and EOS
        assert t["translations"][0]["finished"] is False
        r = c.post("/v1/translate/stream", json={"text": long_text})
        tokens = [line for line in r.text.split("\n") if line == "event: token"]
        assert len(tokens) <= 2


def test_text_limits_count_subwords_after_normalisation(translator: Translator) -> None:
    # U+FDFA is one character that NFKC normalisation turns into 18
    text = "\ufdfa" * 40
    expanded = len(translator.tokenizer.encode_src([text])[0])
    assert expanded > 100
    app = create_app(settings_from(warmup=False, max_tokens=100), translator=translator)
    with running(app) as c:
        for path in ("/v1/translate", "/v1/translate/stream"):
            r = c.post(path, json={"text": ["Pan.", text]})
            assert r.status_code == 422
            assert r.json()["error"]["message"] == (
                f"text 1 is {expanded} subwords long after normalisation; the limit is 100 "
                "(split it into sentences)"
            )
            assert r.json()["error"]["details"][0]["loc"] == ["body", "text", 1]


def test_alignments_are_rounded_and_limited_per_request(translator: Translator) -> None:
    app = create_app(settings_from(warmup=False, max_alignment_texts=2), translator=translator)
    with running(app) as c:
        r = c.post(
            "/v1/translate", json={"text": ["Pan.", "Agua.", "Hoy."], "return_alignments": True}
        )
        assert r.status_code == 422
        assert "return_alignments is allowed for at most 2 texts" in r.json()["error"]["message"]
        r = c.post("/v1/translate", json={"text": ["El gato come pan."], "return_alignments": True})
        rows = r.json()["translations"][0]["alignment"]["attention"]
        weights = [w for row in rows for w in row]
        assert weights and all(round(w, 4) == w for w in weights)
        assert all(abs(sum(row) - 1) < 1e-3 for row in rows)


class Stepping:
    """A scripted translator whose search takes `steps` steps of `step_s` and, like the real
    search, asks `should_stop` between steps."""

    def __init__(self, inner: Translator, steps: int = 500, step_s: float = 0.01) -> None:
        self.inner, self.cfg, self.tokenizer = inner, inner.cfg, inner.tokenizer
        self.options = inner.options
        self.steps, self.step_s = steps, step_s
        self.ran: list[int] = []  # steps each call ran

    def translate(self, texts: list[str], *args: Any, **kw: Any) -> list[TranslationResult]:
        should_stop = kw.get("should_stop")
        for t in range(self.steps):
            if should_stop is not None and should_stop():
                self.ran.append(t)
                raise SearchCancelledError(f"search cancelled after {t} steps")
            time.sleep(self.step_s)
        self.ran.append(self.steps)
        return [TranslationResult(text=t.upper(), score=0.0) for t in texts]

    def translate_stream(self, text: str, *args: Any, **kw: Any) -> TranslationResult:
        kw["on_text"](text.upper())
        return TranslationResult(text=text.upper(), score=0.0)

    def info(self) -> dict[str, Any]:
        return self.inner.info()


def test_a_timed_out_request_stops_costing_model_time(translator: Translator) -> None:
    stepping = Stepping(translator)
    app = create_app(settings_from(warmup=False, request_timeout_s=0.3), translator=stepping)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        start = time.monotonic()
        r = client.post("/v1/translate", json={"text": "Pan."})
        assert r.status_code == 504
        stepping.steps = 1
        r = client.post("/v1/translate", json={"text": "pan"})
        assert r.status_code == 200 and r.json()["translations"][0]["text"] == "PAN"
        # the abandoned search stopped about when its request timed out, not 500 steps later
        assert time.monotonic() - start < 2.5
        assert stepping.ran[0] < 200
        assert "nmt_cancelled_batches_total 1.0" in client.get("/metrics").text


def test_the_batch_budget_counts_beams(translator: Translator) -> None:
    recording = Recording(translator)
    beam = 3
    longest = max(len(ids) for ids in translator.tokenizer.encode_src(TEXTS))
    budget = beam * longest * 2  # room for about two texts of beam 3
    settings = settings_from(batch_tokens=budget, batch_wait_ms=100, warmup=False)
    app = create_app(settings, translator=recording)
    bodies: list[dict[str, Any]] = [{"text": t, "beam_size": beam} for t in TEXTS * 2]
    with serve_in_thread(app) as url:
        responses = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert any(len(texts) > 1 for texts, _ in recording.calls)
    for texts, _ in recording.calls:
        lengths = [len(ids) for ids in translator.tokenizer.encode_src(texts)]
        assert len(texts) == 1 or max(lengths) * len(texts) * beam <= budget, (texts, lengths)


def test_a_big_request_does_not_starve_a_small_one_behind_it(translator: Translator) -> None:
    recording = Recording(translator, delay_s=0.05)
    longest = max(len(ids) for ids in translator.tokenizer.encode_src(["Pan del gato."]))
    settings = settings_from(batch_tokens=longest * 2, batch_wait_ms=0, warmup=False)
    app = create_app(settings, translator=recording)

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            big = asyncio.create_task(
                client.post("/v1/translate", json={"text": ["Pan del gato."] * 20, "beam_size": 1})
            )
            await asyncio.sleep(0.02)
            small = await client.post("/v1/translate", json={"text": "Agua.", "beam_size": 1})
            assert small.status_code == 200
            assert not big.done()  # the small one was served between the big one's batches
            assert (await big).status_code == 200

    with serve_in_thread(app) as url:
        asyncio.run(scenario(url))
    first_small = next(i for i, (texts, _) in enumerate(recording.calls) if "Agua." in texts)
    assert first_small <= 2, [texts for texts, _ in recording.calls]


# -- 3. auth fails closed -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [",", " , ", ""])
def test_a_key_setting_without_keys_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NMT_API_KEYS", value)
    with pytest.raises(ValueError, match="NMT_API_KEYS is set but holds no key"):
        Settings()


@pytest.mark.parametrize("content", ["", "# only a comment\n\n   \n"])
def test_a_keys_file_without_keys_is_a_startup_error(
    translator: Translator, tmp_path: Path, content: str
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(content)
    with pytest.raises(ValueError, match="holds no key"):
        create_app(settings_from(api_keys_file=keys), translator=translator)
    with pytest.raises(ValueError, match="is not a readable file"):
        create_app(settings_from(api_keys_file=tmp_path / "missing"), translator=translator)


def test_non_ascii_keys_are_refused_at_startup(translator: Translator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"U\+00E9"):
        settings_from(api_keys="clé-secrète")
    keys = tmp_path / "keys.txt"
    keys.write_text("good-key\nmañana\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"keys.txt, line 2: an API key contains U\+00F1"):
        create_app(settings_from(api_keys_file=keys), translator=translator)


def test_a_header_with_non_ascii_bytes_is_compared_as_bytes(translator: Translator) -> None:
    app = create_app(settings_from(api_keys="k-one", warmup=False), translator=translator)
    with running(app) as c:
        r = c.post("/v1/translate", json={"text": "Pan."}, headers={"X-API-Key": "k-oné".encode()})
        assert r.status_code == 401
        assert (
            c.post(
                "/v1/translate", json={"text": "Pan."}, headers={"X-API-Key": "k-one"}
            ).status_code
            == 200
        )


# -- 4. connection limits ---------------------------------------------------------------------------


def test_requests_over_the_concurrency_limit_get_503_with_retry_after(
    translator: Translator,
) -> None:
    stepping = Stepping(translator, steps=30, step_s=0.01)
    settings = settings_from(warmup=False, max_concurrent_requests=2, retry_after_s=3)
    app = create_app(settings, translator=stepping)

    async def scenario(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            posts = [client.post("/v1/translate", json={"text": f"t{i}"}) for i in range(6)]
            return list(await asyncio.gather(*posts))

    with serve_in_thread(app) as url:
        responses = asyncio.run(scenario(url))
        assert httpx.get(f"{url}/v1/ready").status_code == 200
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "3"
            assert r.json()["error"]["code"] == "overloaded"
            assert r.json()["error"]["request_id"] == r.headers["X-Request-ID"]


def test_shutdown_does_not_block_the_event_loop(translator: Translator) -> None:
    """Stopping the worker runs off the event loop, and a batch still running when the graceful
    timeout ends is cut off at its next step."""
    stepping = Stepping(translator, steps=100, step_s=0.1)  # 10 s of work
    app = create_app(settings_from(warmup=False, graceful_shutdown_s=1.0), translator=stepping)

    async def scenario() -> float:
        async with app.router.lifespan_context(app):
            assert await asyncio.to_thread(app.state.batcher.wait_ready, 30)
            job = app.state.batcher.submit(["x"], translator.with_options(beam_size=1), 60)
            await asyncio.sleep(0.1)  # the worker is in the middle of the search
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
        stopped = time.monotonic()
        ticker.cancel()
        event = await job.next_event()
        assert event.kind == "error" and event.value.code == "shutting_down"
        assert ticks >= 5  # the loop ran while the worker was being stopped
        return stopped

    start = time.monotonic()
    stopped = asyncio.run(scenario())
    assert stopped - start < 4.0  # the search stopped after the 1 s of grace, not after 10 s


# -- 5. invisible text and non-finite numbers ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["\u200b", "\u200b\u200c\u200d\ufeff", "\u2060 \u00ad", "\u3164", "\u2800\u2800", "\ufe0f"],
)
def test_text_of_invisible_characters_is_a_422(translator: Translator, text: str) -> None:
    app = create_app(settings_from(warmup=False), translator=translator)
    with running(app) as c:
        r = c.post("/v1/translate", json={"text": ["Pan.", text]})
        assert r.status_code == 422
        assert "no visible characters" in r.json()["error"]["message"]
        assert r.json()["error"]["details"][0]["loc"][:3] == ["body", "text", 1]
        # visible text with an invisible character inside is fine
        assert c.post("/v1/translate", json={"text": "Pan\u200b."}).status_code == 200


def test_non_finite_numbers_in_results_become_null_not_a_500(translator: Translator) -> None:
    faulty = Faulty(translator, RuntimeError("unused"))
    faulty.spoil = True
    app = create_app(settings_from(warmup=False), translator=faulty)
    with running(app) as c:
        body = {"text": "El gato.", "beam_size": 2, "n_best": 2, "return_alignments": True}
        r = c.post("/v1/translate", json=body)
        assert r.status_code == 200, r.text
        t = r.json()["translations"][0]
        assert t["score"] is None and [h["score"] for h in t["n_best"]] == [None, None]
        rows = t["alignment"]["attention"]
        assert rows[0][0] is None and rows[-1][-1] is None
        r = c.post("/v1/translate/stream", json={"text": ["El gato.", "Pan."], "beam_size": 2})
        assert r.status_code == 200 and "event: done" in r.text


def test_a_concurrent_load_of_mixed_requests_loses_none(translator: Translator) -> None:
    """Every request gets an answer it can act on: 200, or 503 with Retry-After."""
    settings = settings_from(warmup=False, max_queue=40, max_texts=8, max_concurrent_requests=60)
    app = create_app(settings, translator=translator)
    lock = threading.Lock()
    seen: list[int] = []

    async def scenario(url: str) -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def one(i: int) -> None:
                body = {"text": ["Pan.", "Agua."][: 1 + i % 2], "beam_size": 1 + i % 3}
                r = await client.post("/v1/translate", json=body)
                with lock:
                    seen.append(r.status_code)
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    assert r.headers["Retry-After"]

            await asyncio.gather(*(one(i) for i in range(100)))

    with serve_in_thread(app) as url:
        asyncio.run(scenario(url))
    assert len(seen) == 100 and 200 in seen


def test_the_removed_int8_setting_says_where_int8_went() -> None:
    with pytest.raises(ValueError, match="NMT_QUANTIZE was removed: int8 runs in ONNX Runtime"):
        settings_from(quantize=True)
