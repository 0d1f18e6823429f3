"""Running the service on a loopback port, in a thread or a subprocess, and waiting until it is ready.

Used by the service tests and the load benchmark; everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_ready(
    base_url: str, timeout_s: float = 60.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Polls GET /v1/ready until it answers 200; raises TimeoutError or RuntimeError otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before ready")
            try:
                response = client.get(f"{base_url}/v1/ready")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
                if response.json().get("status") == "failed":
                    raise RuntimeError(f"the model failed to load: {last}")
            except httpx.TransportError as err:
                last = repr(err)
            time.sleep(0.1)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:g} s (last: {last})")


@contextmanager
def serve_in_thread(app: Any, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """Runs `app` with uvicorn in a background thread; yields its base URL once it is ready."""
    config = uvicorn.Config(app, host=HOST, port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://{HOST}:{config.port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        wait_ready(base_url, max(deadline - time.monotonic(), 1.0))
        yield base_url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serve_in_subprocess(
    model_dir: str | Path,
    env: Mapping[str, str | None] | None = None,
    ready_timeout_s: float = 120.0,
    log_path: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Runs `nmt serve --model MODEL_DIR` on a free loopback port; yields (base URL, process).

    `env` adds NMT_* settings (None removes a variable). On exit the server gets SIGTERM (a graceful shutdown), then SIGKILL
    if it has not stopped within 20 s.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "nmt.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", HOST, "--port", str(port)]
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://{HOST}:{port}"
    try:
        wait_ready(base_url, ready_timeout_s, proc)
        yield base_url, proc
    finally:
        stop_process(proc)
        if log_path is not None and not isinstance(log, int):
            log.close()


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 20.0) -> int:
    """SIGTERM, wait, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)
