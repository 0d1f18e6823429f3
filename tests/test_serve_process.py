"""`nmt serve` as a real server process on a loopback port: ready, answers, shuts down cleanly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from serve.runner import serve_in_subprocess, stop_process


def test_nmt_serve_process_serves_every_endpoint_and_stops_on_sigterm(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {"NMT_API_KEYS": "s3cret", "NMT_BATCH_WAIT_MS": "2", "NMT_MAX_TEXTS": "4"}
    log = tmp_path / "server.log"
    with serve_in_subprocess(tiny_model_dir, env=env, log_path=log) as (url, proc):
        key = {"Authorization": "Bearer s3cret"}
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v1/health").json() == {"status": "ok"}
            assert client.get("/v1/ready").json()["status"] == "ready"
            assert client.post("/v1/translate", json={"text": "sol"}).status_code == 401

            r = client.post("/v1/translate", json={"text": ["El perro.", "Una casa."]}, headers=key)
            assert r.status_code == 200
            assert [bool(t["text"]) for t in r.json()["translations"]] == [True, True]
            assert r.headers["X-Request-ID"] == r.json()["request_id"]

            r = client.post("/v1/translate", json={"text": ["sol"] * 5}, headers=key)
            assert r.status_code == 422 and "at most 4 texts" in r.json()["error"]["message"]

            body = {"text": "El gato come pan hoy.", "beam_size": 1}
            with client.stream("POST", "/v1/translate/stream", json=body, headers=key) as r:
                events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
            assert events[-2:] == ["translation", "done"] and events[0] == "token"

            info = client.get("/v1/model", headers=key).json()
            assert info["name"] == "tiny" and info["limits"]["max_texts"] == 4
            metrics = client.get("/metrics", headers=key).text
            assert 'route="/v1/translate",status="200"' in metrics
            spec = client.get("/openapi.json").json()
            assert spec["info"]["title"] == "NMT translation service"
        # uvicorn shuts down gracefully, then re-raises SIGTERM: exit code 0 or -SIGTERM
        assert stop_process(proc) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "serving" in text and "Application shutdown complete" in text
    assert json.dumps(str(tiny_model_dir))[1:-1] in text
