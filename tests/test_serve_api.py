"""The REST API over a tiny trained model: endpoints, streaming, errors, limits, auth, CORS, page."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nmt.translate import Translator
from serve.app import create_app
from serve.settings import settings_from


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


@contextmanager
def running(translator: Translator, **settings: Any) -> Iterator[TestClient]:
    app = create_app(settings_from(**settings), translator=translator)
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        yield client


@pytest.fixture(scope="module")
def client(translator: Translator) -> Iterator[TestClient]:
    with running(translator, max_chars=200, max_texts=8, max_body_bytes=4096) as c:
        yield c


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """[(event, data), ...] from a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- translation ----------------------------------------------------------------------------


def test_translate_one_text_gives_the_translators_output_and_a_request_id(
    client: TestClient, translator: Translator
) -> None:
    r = client.post("/v1/translate", json={"text": "El gato come pan hoy."})
    assert r.status_code == 200
    body = r.json()
    expected = translator.translate(["El gato come pan hoy."])[0]
    [t] = body["translations"]
    assert t["text"] == expected.text
    assert t["score"] == pytest.approx(expected.score, abs=1e-4)
    assert t["finished"] is True
    assert t["alignment"] is None
    assert body["model"] == translator.cfg.name
    assert len(body["request_id"]) >= 16
    assert r.headers["X-Request-ID"] == body["request_id"]


def test_translate_list_keeps_input_order(client: TestClient, translator: Translator) -> None:
    texts = [
        "El perro ve la luna.",
        "Hoy.",
        "La mujer busca un libro y agua mañana.",
        "Mi amigo tiene flores.",
    ]
    r = client.post("/v1/translate", json={"text": texts, "beam_size": 2})
    assert r.status_code == 200
    got = [t["text"] for t in r.json()["translations"]]
    assert got == [
        translator.translate([t], translator.with_options(beam_size=2))[0].text for t in texts
    ]


def test_n_best_and_alignments(client: TestClient, translator: Translator) -> None:
    body = {
        "text": ["El hombre quiere pan."],
        "beam_size": 3,
        "n_best": 3,
        "return_alignments": True,
    }
    r = client.post("/v1/translate", json=body)
    assert r.status_code == 200
    [t] = r.json()["translations"]
    scores = [h["score"] for h in t["n_best"]]
    assert len(t["n_best"]) == 3
    assert scores == sorted(scores, reverse=True)
    assert t["n_best"][0]["text"] == t["text"]
    a = t["alignment"]
    ids = translator.tokenizer.encode_src(["El hombre quiere pan."])[0]
    assert a["src_tokens"] == translator.tokenizer.src_pieces(ids)
    assert a["tgt_tokens"][-1] == "</s>"
    assert len(a["attention"]) == len(a["tgt_tokens"])
    for row in a["attention"]:
        assert len(row) == len(a["src_tokens"])
        assert sum(row) == pytest.approx(1.0, abs=1e-3)


def test_max_length_caps_the_output(client: TestClient, translator: Translator) -> None:
    r = client.post("/v1/translate", json={"text": "La niña ve una casa ahora.", "max_length": 1})
    [t] = r.json()["translations"]
    expected = translator.translate(
        ["La niña ve una casa ahora."], translator.with_options(max_len_a=0.0, max_len_b=1)
    )[0]
    assert t["text"] == expected.text
    assert len(t["text"].split()) <= 1  # one subword is at most one word


def test_client_request_id_is_echoed_and_a_bad_one_replaced(client: TestClient) -> None:
    r = client.post("/v1/translate", json={"text": "Pan."}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    assert r.json()["request_id"] == "abc-123"
    r = client.get("/v1/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(r.headers["X-Request-ID"]) == 32


# -- streaming ------------------------------------------------------------------------------


def test_stream_one_greedy_text_sends_tokens_in_order_then_done(
    client: TestClient, translator: Translator
) -> None:
    r = client.post("/v1/translate/stream", json={"text": "El gato come pan hoy.", "beam_size": 1})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-2:] == ["translation", "done"]
    assert set(kinds[:-2]) == {"token"} and len(kinds) >= 3
    tokens = [data["text"] for kind, data in events if kind == "token"]
    assert len(set(tokens)) == len(tokens)  # each event adds something
    expected = translator.translate(
        ["El gato come pan hoy."], translator.with_options(beam_size=1)
    )[0].text
    assert tokens[-1] == events[-2][1]["text"] == expected
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(tokens))
    assert events[-1][1] == {"request_id": r.headers["X-Request-ID"], "count": 1}


def test_stream_many_texts_sends_one_event_per_text_in_order(
    client: TestClient, translator: Translator
) -> None:
    texts = ["Pan.", "El perro quiere una casa mañana.", "La luna."]
    r = client.post("/v1/translate/stream", json={"text": texts, "beam_size": 2, "n_best": 2})
    events = parse_sse(r.text)
    assert [kind for kind, _ in events] == ["translation"] * 3 + ["done"]
    assert [data["index"] for _, data in events[:3]] == [0, 1, 2]
    expected = translator.translate(texts, translator.with_options(beam_size=2, n_best=2))
    for (_, data), result in zip(events, expected, strict=False):
        assert data["text"] == result.text
        assert [h["text"] for h in data["n_best"]] == [t for t, _ in result.n_best]
    assert events[-1][1]["count"] == 3


def test_stream_rejects_bad_input_before_streaming(client: TestClient) -> None:
    r = client.post("/v1/translate/stream", json={"text": ""})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"


# -- service endpoints ----------------------------------------------------------------------


def test_health_ready_and_model(client: TestClient, translator: Translator) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    assert client.get("/v1/ready").json()["status"] == "ready"
    info = client.get("/v1/model").json()
    recorded = translator.info()
    assert (info["src_lang"], info["tgt_lang"]) == ("es", "en")
    assert info["name"] == recorded["name"] == translator.cfg.name
    assert info["parameters"] == recorded["parameters"] and info["parameters"]["total"] > 0
    assert info["default_beam_size"] == translator.cfg.decode.beam_size
    assert info["config"]["model"] == recorded["config"]["model"]
    assert info["config"]["data"] == {"src_lang": "es", "tgt_lang": "en"}  # no server file paths
    assert info["scores"] == json.loads(json.dumps(recorded["scores"]))  # e.g. BLEU at training
    assert info["limits"]["max_chars"] == 200
    assert info["auth"] is False


def test_metrics_count_requests_batches_and_queue(client: TestClient) -> None:
    client.post("/v1/translate", json={"text": ["Pan.", "luna"]})
    client.post("/v1/translate", json={"text": ""})
    text = client.get("/metrics").text
    assert 'nmt_http_requests_total{method="POST",route="/v1/translate",status="200"}' in text
    assert 'nmt_http_requests_total{method="POST",route="/v1/translate",status="422"}' in text
    assert 'nmt_http_request_duration_seconds_bucket{le="0.5",method="POST",route=' in text
    assert "nmt_batch_size_texts_count" in text
    assert "nmt_queue_depth_texts 0.0" in text
    assert "nmt_model_ready 1.0" in text


def test_ready_is_503_until_the_model_has_loaded(tiny_model_dir: Path) -> None:
    gate = threading.Event()

    def slow_load() -> Translator:
        assert gate.wait(30)
        return Translator.load(tiny_model_dir)

    app = create_app(settings_from(), load=slow_load)
    with TestClient(app) as c:
        r = c.get("/v1/ready")
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        assert c.get("/v1/health").status_code == 200
        r = c.post("/v1/translate", json={"text": "Pan."})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "not_ready")
        assert r.headers["Retry-After"] == "1"
        gate.set()
        assert app.state.batcher.wait_ready(30)
        assert c.get("/v1/ready").status_code == 200
        assert c.post("/v1/translate", json={"text": "Pan."}).status_code == 200


def test_a_model_that_fails_to_load_is_reported_not_ready(tmp_path: Path) -> None:
    app = create_app(settings_from(model_dir=tmp_path / "missing"))
    with TestClient(app) as c:
        assert not app.state.batcher.wait_ready(10)
        r = c.get("/v1/ready")
        assert (r.status_code, r.json()["status"]) == (503, "failed")
        assert str(tmp_path) not in r.text
        assert c.post("/v1/translate", json={"text": "Pan."}).status_code == 503


def test_web_page_and_its_assets_are_served(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<textarea id="source"' in r.text and "/static/app.js" in r.text
    assert "drawHeatmap" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_openapi_describes_versioned_endpoints_with_the_real_limits(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/translate", "/v1/translate/stream", "/v1/health", "/v1/ready", "/v1/model"):
        assert path in spec["paths"]
    assert "/metrics" in spec["paths"]
    request = spec["components"]["schemas"]["TranslateRequest"]
    text = request["properties"]["text"]["anyOf"]
    assert text[0]["maxLength"] == 200 and text[1]["maxItems"] == 8
    assert request["additionalProperties"] is False
    responses = spec["paths"]["/v1/translate"]["post"]["responses"]
    for status in ("413", "422", "503", "504"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert (
        "text/event-stream"
        in spec["paths"]["/v1/translate/stream"]["post"]["responses"]["200"]["content"]
    )


# -- bad input ------------------------------------------------------------------------------

BAD_BODIES = [
    ({"text": ""}, "text.0: String should have at least 1 character"),
    ({"text": "   \t "}, "text.0: text is empty or only whitespace"),
    ({"text": ["ok", "bell\x07"]}, "text.1: text contains a control character (U+0007)"),
    ({"text": "two\nlines"}, "send one sentence per text"),
    ({"text": []}, "text: at least one text is needed"),
    ({"text": None}, "text: Input should be a valid list"),
    ({"text": 5}, "text: Input should be a valid list"),
    ({"text": [5]}, "text.0: Input should be a valid string"),
    ({"text": "x" * 201}, "text.0: String should have at most 200 characters"),
    ({"text": ["Pan."] * 9}, "text: at most 8 texts per request allowed (got 9)"),
    ({}, "text: Field required"),
    ({"text": "Pan.", "beam": 3}, "beam: unknown field"),
    ({"text": "Pan.", "beam_size": "3"}, "beam_size: Input should be a valid integer"),
    ({"text": "Pan.", "beam_size": 2.5}, "beam_size: Input should be a valid integer"),
    ({"text": "Pan.", "beam_size": 0}, "beam_size: Input should be greater than or equal to 1"),
    ({"text": "Pan.", "beam_size": 17}, "beam_size: Input should be less than or equal to 16"),
    ({"text": "Pan.", "max_length": 513}, "max_length: Input should be less than or equal to 512"),
    (
        {"text": "Pan.", "return_alignments": "yes"},
        "return_alignments: Input should be a valid boolean",
    ),
    ({"text": "Pan.", "n_best": 3, "beam_size": 2}, "n_best (3) cannot exceed beam_size (2)"),
    ([{"text": "Pan."}], "Input should be a valid dictionary"),
    ({"text": "Pan.", "top_p": 0.5}, "top_p applies to sampling only"),
    ({"text": "Pan.", "sampling": "topk", "beam_size": 3}, "sampling draws one output"),
    ({"text": "Pan.", "sampling": "greedy"}, "sampling: Input should be 'topk' or 'topp'"),
    ({"text": "Pan.", "sampling": "topp", "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"text": "Pan.", "temperature": 11}, "temperature: Input should be less than or equal"),
    ({"text": "Pan.", "length_penalty": -1}, "length_penalty: Input should be greater than"),
    ({"text": "Pan.", "no_repeat_ngram": 11}, "no_repeat_ngram: Input should be less than"),
    ({"text": ["Pan.", "Sol."], "target_prefix": ["The"]}, "target_prefix has 1 entries for 2"),
    ({"text": "Pan.", "target_prefix": "a\x07"}, "target prefix contains U+0007"),
]


@pytest.mark.parametrize("path", ["/v1/translate", "/v1/translate/stream"])
@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_input_is_a_422_naming_the_problem(
    client: TestClient, path: str, body: Any, message: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["status"] == 422
    assert message in error["message"], error["message"]
    assert error["request_id"] == r.headers["X-Request-ID"]
    assert error["details"] and error["details"][0]["loc"][0] == "body"


def test_n_best_over_the_models_default_beam_is_a_422(
    client: TestClient, translator: Translator
) -> None:
    beam = translator.cfg.decode.beam_size
    r = client.post("/v1/translate", json={"text": "Pan.", "n_best": beam + 1})
    assert r.status_code == 422
    message = f"n_best ({beam + 1}) cannot exceed beam_size ({beam}) (the model's default"
    assert r.json()["error"]["message"].startswith(message)
    assert r.json()["error"]["details"][0]["loc"] == ["body", "n_best"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "Pan."', "the body is not valid JSON"),
        (b"", "a JSON request body is required"),
        (b"\xff\xfe", "the body is not valid JSON"),
        (b'{"text": "\\ud800"}', "unable to parse raw data as a unicode string"),
    ],
)
def test_malformed_json_is_a_422(client: TestClient, content: bytes, message: str) -> None:
    r = client.post("/v1/translate", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert message in r.json()["error"]["message"]


def test_a_body_over_the_size_limit_is_a_413(client: TestClient) -> None:
    big = json.dumps({"text": ["Pan. " * 40] * 30}).encode()  # > 4096 bytes
    r = client.post("/v1/translate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "request body is larger than the limit of 4096 bytes"
    assert r.json()["error"]["request_id"] == r.headers["X-Request-ID"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield from (big[i : i + 1000] for i in range(0, len(big), 1000))

    r = client.post("/v1/translate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_unknown_paths_and_methods_have_the_error_shape(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = client.get("/v1/translate")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")


def test_decoding_options_of_a_request_are_the_translators(
    client: TestClient, translator: Translator
) -> None:
    text = "La mujer busca un libro y la niña ve la luna mañana."
    cases = [
        ({"beam_size": 1, "no_repeat_ngram": 1}, {"beam_size": 1, "no_repeat_ngram": 1}),
        ({"beam_size": 2, "length_penalty": 1.5, "coverage_penalty": 0.3},
         {"beam_size": 2, "length_penalty": 1.5, "coverage_penalty": 0.3}),
        ({"min_length": 9}, {"min_len": 9}),
        ({"sampling": "topp", "top_p": 0.8, "seed": 5},
         {"sampling": "topp", "top_p": 0.8, "seed": 5, "beam_size": 1}),
        ({"sampling": "topk", "top_k": 3, "temperature": 0.7, "seed": 2},
         {"sampling": "topk", "top_k": 3, "temperature": 0.7, "seed": 2, "beam_size": 1}),
    ]  # fmt: skip
    for body, options in cases:
        expected = translator.translate([text], translator.with_options(**options))[0].text
        r = client.post("/v1/translate", json={"text": text, **body})
        assert r.status_code == 200, r.text
        assert r.json()["translations"][0]["text"] == expected, body
        # token streaming applies the same options (one text, beam 1)
        if options.get("beam_size") == 1:
            events = parse_sse(
                client.post("/v1/translate/stream", json={"text": text, **body}).text
            )
            assert events[0][0] == "token"
            final = [d for e, d in events if e == "translation"][0]
            assert final["text"] == expected and final["score"] is not None


def test_a_target_prefix_starts_the_translation_in_every_route(
    client: TestClient, translator: Translator
) -> None:
    texts = ["El gato come pan hoy.", "Mi amigo tiene flores."]
    prefixes = ["The cat «quickly»", ""]
    expected = [r.text for r in translator.translate(texts, translator.with_options(beam_size=2),
                                                     prefixes=prefixes)]  # fmt: skip
    assert expected[0].startswith(prefixes[0])
    r = client.post(
        "/v1/translate", json={"text": texts, "beam_size": 2, "target_prefix": prefixes}
    )
    assert [t["text"] for t in r.json()["translations"]] == expected
    body = {"text": texts[0], "beam_size": 1, "target_prefix": "The dog"}
    events = parse_sse(client.post("/v1/translate/stream", json=body).text)
    tokens = [d["text"] for e, d in events if e == "token"]
    assert tokens and all(t.startswith("The dog") for t in tokens)
    long = {"text": texts[0], "target_prefix": "the dog and the cat and the man"}
    with running(translator, max_output_length=4) as c:
        r = c.post("/v1/translate", json=long)
    assert r.status_code == 422 and "the output limit is 4" in r.json()["error"]["message"]
    assert r.json()["error"]["details"][0]["loc"] == ["body", "target_prefix", 0]


# -- auth and CORS --------------------------------------------------------------------------


def test_api_keys_guard_translation_but_not_health(translator: Translator, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# one key per line\nfile-key\n\n")
    with running(translator, api_keys="k-one, k-two", api_keys_file=keys_file) as c:
        body = {"text": "Pan."}
        missing = c.post("/v1/translate", json=body)
        wrong = c.post("/v1/translate", json=body, headers={"Authorization": "Bearer k-three"})
        scheme = c.post("/v1/translate", json=body, headers={"Authorization": "Basic k-one"})
        header = c.post("/v1/translate", json=body, headers={"X-API-Key": "k-"})
        for r in (missing, wrong, scheme, header):
            assert r.status_code == 401
            assert r.json()["error"]["message"] == "missing or invalid API key"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert c.post("/v1/translate/stream", json=body).status_code == 401
        assert c.get("/v1/model").status_code == 401
        assert c.get("/metrics").status_code == 401
        ok = [
            c.post("/v1/translate", json=body, headers={"Authorization": "Bearer k-two"}),
            c.post("/v1/translate", json=body, headers={"X-API-Key": "k-one"}),
            c.post("/v1/translate", json=body, headers={"X-API-Key": "file-key"}),
            c.get("/v1/model", headers={"X-API-Key": "k-one"}),
        ]
        assert [r.status_code for r in ok] == [200] * 4
        assert ok[-1].json()["auth"] is True
        for open_path in ("/v1/health", "/v1/ready", "/"):
            assert c.get(open_path).status_code == 200
        for docs_path in ("/openapi.json", "/docs", "/redoc"):  # the docs follow the keys
            assert c.get(docs_path).status_code == 401
            assert c.get(docs_path, headers={"X-API-Key": "k-one"}).status_code == 200
        key = {"X-API-Key": "k-two"}
        schemes = c.get("/openapi.json", headers=key).json()["components"]["securitySchemes"]
        assert {"HTTPBearer", "APIKeyHeader"} <= set(schemes)


@pytest.mark.parametrize(("docs", "status"), [("public", 200), ("off", 404)])
def test_docs_can_be_opened_or_switched_off_under_auth(
    translator: Translator, docs: str, status: int
) -> None:
    with running(translator, api_keys="k-one", docs=docs) as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(path).status_code == status, path
        assert c.post("/v1/translate", json={"text": "Pan."}).status_code == 401


def test_without_keys_no_auth_is_needed_or_advertised(client: TestClient) -> None:
    assert client.post("/v1/translate", json={"text": "Pan."}).status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_cors_is_closed_by_default_and_opens_for_configured_origins(
    client: TestClient, translator: Translator
) -> None:
    preflight = {
        "Origin": "https://example.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = client.options("/v1/translate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    with running(translator, cors_origins="https://example.org") as c:
        r = c.options("/v1/translate", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        r = c.post(
            "/v1/translate", json={"text": "Pan."}, headers={"Origin": "https://example.org"}
        )
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        assert "X-Request-ID" in r.headers["access-control-expose-headers"]
        r = c.options("/v1/translate", headers={**preflight, "Origin": "https://evil.test"})
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
