"""Several models in one server and reloading them without downtime, through real HTTP."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.runner import serve_in_thread
from serve.settings import settings_from

TEXTS = ["El gato come pan hoy.", "La niña tiene flores.", "Mi amigo ve la luna mañana."]


def test_reload_under_load_fails_no_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = settings_from(model_dir=str(model), admin_keys="admin-key", warmup=False,
                             torch_threads=1, cache_size=0)  # fmt: skip
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()
    with serve_in_thread(create_app(settings)) as url:

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    r = http.post(f"{url}/v1/translate", json={"text": TEXTS, "beam_size": 2})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    answered[0] += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(2):  # training writes a better model: the directory is swapped
            fresh = tmp_path / "fresh"
            shutil.copytree(tiny_model_dir, fresh)
            shutil.rmtree(model)
            fresh.rename(model)
            before = answered[0]
            r = httpx.post(f"{url}/v1/admin/reload", headers={"X-API-Key": "admin-key"},
                           timeout=120)  # fmt: skip
            assert r.status_code == 200, r.text
            time.sleep(0.3)
            assert answered[0] > before  # requests were being answered across the swap
        stop.set()
        for t in threads:
            t.join(60)
        models = httpx.get(f"{url}/v1/models").json()["models"]
    assert failures == []
    assert answered[0] >= 10
    assert models[0]["generation"] == 2 and models[0]["ready"]


def test_reload_needs_an_admin_key_and_a_loadable_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    app = create_app(settings_from(model_dir=str(model), admin_keys="admin-key", warmup=False))
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        assert client.post("/v1/admin/reload").status_code == 401
        wrong = client.post("/v1/admin/reload", headers={"X-API-Key": "api-key"})
        assert wrong.status_code == 401
        (model / "model.safetensors").write_bytes(b"broken")
        r = client.post("/v1/admin/reload", headers={"X-API-Key": "admin-key"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "reload_failed"
        assert "old model keeps serving" in r.json()["error"]["message"]
        assert client.post("/v1/translate", json={"text": "Hoy."}).status_code == 200
        assert client.get("/v1/ready").status_code == 200
        r = client.post("/v1/admin/reload", headers={"X-API-Key": "admin-key"},
                        json={"model": "nope"})  # fmt: skip
        assert r.status_code == 422 and "no model named 'nope'" in r.json()["error"]["message"]


def test_reload_is_refused_without_admin_keys(tiny_model_dir: Path) -> None:
    app = create_app(settings_from(model_dir=str(tiny_model_dir), warmup=False))
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        r = client.post("/v1/admin/reload")
        assert r.status_code == 403 and "NMT_ADMIN_KEYS" in r.json()["error"]["message"]


@pytest.mark.parametrize("value", ["a;b", "a, b;c"])
def test_several_model_dirs_are_several_models(value: str) -> None:
    app = create_app(settings_from(model_dir=value), load=None)
    names = [m.name for m in app.state.service.registry.models]
    assert len(names) == len(value.split(";")) and len(set(names)) == len(names)
