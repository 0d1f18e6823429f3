"""The live WebSocket route, driven by a real WebSocket client against a real `nmt serve`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from test_simultaneous import SENTENCES, alone, by_word, train_tiny_waitk
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from nmt.simultaneous import simulate
from nmt.translate import Translator
from serve.app import create_app
from serve.live import LIVE_PATH
from serve.runner import serve_in_subprocess
from serve.settings import settings_from

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SENTENCE = "La niña busca una casa mañana."


@pytest.fixture(scope="module")
def waitk_model_dir(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_waitk(toy_corpus, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(waitk_model_dir: Path) -> Iterator[str]:
    env = {"NMT_API_KEYS": KEY, "NMT_MAX_CHARS": "120", "NMT_MAX_TOKENS": "40",
           "NMT_WARMUP": "false"}  # fmt: skip
    with serve_in_subprocess(waitk_model_dir, env=env) as (url, _):
        yield url


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + LIVE_PATH


def frames(ws: ClientConnection, until: str = "done") -> list[dict[str, Any]]:
    """Frames received until one of type `until` (included)."""
    out = []
    while True:
        frame = json.loads(ws.recv(timeout=10))
        out.append(frame)
        if frame["type"] in (until, "error"):
            return out


def closed_with(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    """The error frame the server sent (after its ready frame, if any) and the close code."""
    error = json.loads(ws.recv(timeout=10))
    if error["type"] == "ready":
        error = json.loads(ws.recv(timeout=10))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    return error, closed.value.rcvd.code


def live_sessions(url: str) -> float:
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    line = next(x for x in metrics.splitlines() if x.startswith("nmt_live_sessions "))
    return float(line.split()[1])


def test_each_word_releases_its_target_words_before_the_next_word_is_sent(
    server: str, waitk_model_dir: Path
) -> None:
    expected = simulate(Translator.load(waitk_model_dir), SENTENCE, 2)
    words = SENTENCE.split()
    with connect(ws_url(server), additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "start", "k": 2}))
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready" and ready["k"] == 2
        assert ready["limits"]["max_chars"] == 120
        released: list[str] = []
        for read, word in enumerate(words[:-1], 1):
            ws.send(json.dumps({"type": "text", "text": word + " "}))
            due = expected.delays.count(read)  # target words this word lets the policy commit
            if due:
                frame = json.loads(ws.recv(timeout=10))
                assert frame["type"] == "words" and frame["source_words"] == read
                assert frame["frame"] == read + 1  # the start frame, then one per word
                assert len(frame["words"]) == due
                released += frame["words"]
        ws.send(json.dumps({"type": "text", "text": words[-1]}))  # no space: still typing
        ws.send(json.dumps({"type": "end"}))
        rest = frames(ws)
    released += [w for f in rest if f["type"] == "words" for w in f["words"]]
    assert " ".join(released) == expected.text == rest[-1]["text"]


def test_the_key_is_required_in_a_header_or_the_start_frame(server: str) -> None:
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "text", "text": "El gato "}))
        error, code = closed_with(ws)
        assert error["error"]["code"] == "unauthorized" and code == 1008
    with connect(ws_url(server), additional_headers={"X-API-Key": "wrong"}) as ws:
        ws.send(json.dumps({"type": "start", "api_key": "wrong"}))
        assert closed_with(ws)[1] == 1008
    with connect(ws_url(server)) as ws:  # a browser: the key in the start frame
        ws.send(json.dumps({"type": "start", "api_key": KEY, "k": 3}))
        assert json.loads(ws.recv(timeout=10))["k"] == 3


@pytest.mark.parametrize(
    "frame,code,close",
    [
        (b"\x00\x01", "invalid_request", 1003),  # binary
        ("not json", "invalid_request", 1007),
        (json.dumps({"type": "translate"}), "invalid_request", 1007),
        (json.dumps(["text"]), "invalid_request", 1007),
        (json.dumps({"type": "text", "text": 5}), "invalid_request", 1007),
        (json.dumps({"type": "start", "k": 0}), "invalid_request", 1008),
        (json.dumps({"type": "text", "text": "palabra " * 20}), "too_long", 1008),  # > 120 chars
        (json.dumps({"type": "text", "text": "a " * 50}), "too_long", 1008),  # > 40 subwords
        ("x" * 2000, "payload_too_large", 1009),
    ],
)
def test_bad_frames_get_an_error_frame_and_a_close_and_the_server_stays_healthy(
    server: str, frame: str | bytes, code: str, close: int
) -> None:
    with connect(ws_url(server), additional_headers=AUTH) as ws:
        ws.send(frame)
        error, close_code = closed_with(ws)
    assert error["type"] == "error" and error["error"]["code"] == code, error
    assert close_code == close and error["error"]["request_id"]
    assert httpx.get(server + "/v1/health").status_code == 200
    with connect(ws_url(server), additional_headers=AUTH) as ws:  # others are served
        ws.send(json.dumps({"type": "text", "text": "Agua."}))
        ws.send(json.dumps({"type": "end"}))
        assert frames(ws)[-1]["type"] == "done"


def test_clients_that_leave_mid_sentence_free_their_sessions_at_once(server: str) -> None:
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(connect(ws_url(server), additional_headers=AUTH)) for _ in range(4)
        ]
        for ws in sockets:
            ws.send(json.dumps({"type": "text", "text": "El perro quiere "}))
        for ws in sockets:
            json.loads(ws.recv(timeout=10))  # ready
        assert live_sessions(server) >= 4
    # the sockets are closed mid-sentence: no end frame
    deadline = time.monotonic() + 5
    while live_sessions(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_sessions(server) == 0
    metrics = httpx.get(server + "/metrics", headers=AUTH).text
    assert f'route="{LIVE_PATH}"' in metrics
    with connect(ws_url(server), additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "text", "text": "El perro quiere agua."}))
        ws.send(json.dumps({"type": "end"}))
        assert frames(ws)[-1]["type"] == "done"


def test_concurrent_clients_sending_ahead_each_get_what_they_get_alone(
    server: str, waitk_model_dir: Path
) -> None:
    translator = Translator.load(waitk_model_dir)
    plan = [(1, SENTENCES[0]), (2, SENTENCES[1]), (4, SENTENCES[2]), (30, SENTENCES[3]),
            (2, SENTENCES[4])]  # fmt: skip

    def client(k: int, text: str) -> list[tuple[int, int, list[str]]]:
        """Sends the whole sentence word by word without waiting, then reads the answers."""
        with connect(ws_url(server), additional_headers=AUTH) as ws:
            ws.send(json.dumps({"type": "start", "k": k}))
            for frame in by_word(text):
                ws.send(json.dumps({"type": "end"} if frame is None else
                                   {"type": "text", "text": frame}))  # fmt: skip
            got = frames(ws)[1:]  # after the ready frame
        # a frame's words may come in several releases (one per step that completes some):
        # joined per client frame, in order
        joined: list[tuple[int, int, list[str]]] = []
        for f in (f for f in got if f["type"] == "words"):
            if joined and joined[-1][0] == f["frame"]:
                assert joined[-1][1] == f["source_words"]
                joined[-1][2].extend(f["words"])
            else:
                joined.append((f["frame"], f["source_words"], list(f["words"])))
        return joined

    def leaver() -> None:
        """Leaves as soon as it has sent the end of a sentence with every step still to write."""
        with connect(ws_url(server), additional_headers=AUTH) as ws:
            ws.send(json.dumps({"type": "start", "k": 30}))
            ws.send(json.dumps({"type": "text", "text": SENTENCES[1]}))
            ws.send(json.dumps({"type": "end"}))

    with ThreadPoolExecutor(len(plan) + 1) as pool:
        left = pool.submit(leaver)
        results = list(pool.map(client, *zip(*plan, strict=True)))
        left.result()
    for got, (k, text) in zip(results, plan, strict=True):
        answers = alone(translator, k, by_word(text)).answers
        # the start frame is frame 1, the sentence's frames 2, 3, ...
        assert got == [(i + 2, read, words) for i, (words, read) in enumerate(answers) if words]
    deadline = time.monotonic() + 5
    while live_sessions(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_sessions(server) == 0


def test_a_model_with_a_bidirectional_encoder_is_refused_clearly(tiny_model_dir: Path) -> None:
    app = create_app(settings_from(warmup=False), translator=Translator.load(tiny_model_dir))
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/v1/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        with client.websocket_connect(LIVE_PATH) as ws:
            ws.send_text(json.dumps({"type": "text", "text": "El gato "}))
            error = ws.receive_json()
            assert error["error"]["code"] == "not_streaming"
            assert "layout: uni" in error["error"]["message"]
