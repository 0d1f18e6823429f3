"""`nmt serve` as a real server process on a loopback port: ready, answers, shuts down cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve.runner import HOST, free_port, serve_in_subprocess, stop_process


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
            spec = client.get("/openapi.json", headers=key).json()
            assert spec["info"]["title"] == "NMT translation service"
        # uvicorn shuts down gracefully, then re-raises SIGTERM: exit code 0 or -SIGTERM
        assert stop_process(proc) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "serving" in text and "Application shutdown complete" in text
    assert json.dumps(str(tiny_model_dir))[1:-1] in text


def serve_command(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "nmt.cli", "serve", "--model", str(model_dir),
            "--host", HOST, "--port", str(port)]  # fmt: skip


def test_a_slow_client_cannot_hold_shutdown_beyond_the_graceful_timeout(
    tiny_model_dir: Path,
) -> None:
    env = {"NMT_GRACEFUL_SHUTDOWN_S": "2", "NMT_WARMUP": "false"}
    with serve_in_subprocess(tiny_model_dir, env=env) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection((HOST, port)) as slow:
            # headers promise a body that never comes: the request stays open
            slow.sendall(
                b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"text": '
            )
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            assert time.monotonic() - start < 8  # 2 s of grace, not forever


def test_nmt_serve_exits_non_zero_when_the_model_cannot_be_loaded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # weights that do not fit the config pass the file checks and fail in the server's loading
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    config = mismatched / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["decoder"]["hidden_dim"] += 8
    config.write_text(yaml.safe_dump(cfg))
    for model_dir, code in ((truncated, 2), (mismatched, 1)):
        proc = subprocess.run(
            serve_command(model_dir, free_port()),
            env={**os.environ, "NMT_WARMUP": "false"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == code, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("nmt serve: error: ") and "model.safetensors" in last, last
    assert "the model failed to load" in last


def test_nmt_serve_can_be_asked_to_wait_for_a_broken_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    port = free_port()
    cmd = serve_command(broken, port) + ["--wait-for-model", "0.5"]
    proc = subprocess.Popen(cmd, env={**os.environ, "NMT_WARMUP": "false"})
    try:
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status != "failed":
            try:
                status = httpx.get(f"{url}/v1/ready").json()["status"]
            except httpx.TransportError:
                time.sleep(0.2)
        assert status == "failed" and proc.poll() is None
        weights.write_bytes(good)  # the operator fixes the files; the server picks them up
        while time.monotonic() < deadline and status != "ready":
            status = httpx.get(f"{url}/v1/ready").json()["status"]
            time.sleep(0.1)
        assert status == "ready"
        r = httpx.post(f"{url}/v1/translate", json={"text": "Pan."}, timeout=30)
        assert r.status_code == 200
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NMT_API_KEYS": ","}, "NMT_API_KEYS is set but holds no key"),
        ({"NMT_API_KEYS": ""}, "NMT_API_KEYS is set but holds no key"),
        ({"NMT_API_KEYS": "cl\u00e9"}, "keys must be printable ASCII"),
    ],
)
def test_nmt_serve_refuses_to_start_with_auth_settings_that_yield_no_usable_key(
    tiny_model_dir: Path, env: dict[str, str], message: str
) -> None:
    proc = subprocess.run(
        serve_command(tiny_model_dir, free_port()),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
