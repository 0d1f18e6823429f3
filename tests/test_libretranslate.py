"""The LibreTranslate-compatible API through real HTTP: the `libretranslatepy` client, form and JSON
bodies as Mastodon sends them, `auto` detection between two served models, documents and HTML,
errors in LibreTranslate's shape; the translation cache and confidence of the /v1 API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from libretranslatepy import LibreTranslateAPI

from nmt.translate import Translator
from serve.app import create_app
from serve.runner import serve_in_subprocess
from serve.settings import settings_from


@pytest.fixture(scope="module")
def en_es_model_dir(toy_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second language pair: configs/tiny.yaml trained briefly en -> es on the toy corpus."""
    from nmt.config import load_config
    from nmt.train import train

    config = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    cfg = load_config(config, [f"data.corpus={toy_corpus}", "data.src_lang=en",
                               "data.tgt_lang=es", "train.max_steps=60", "name=tiny-en-es",
                               "train.valid_every=60", "train.valid_max_sentences=5"])  # fmt: skip
    run = tmp_path_factory.mktemp("tiny-en-es")
    train(cfg, run, progress=False)
    return run / "model"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, en_es_model_dir: Path) -> Iterator[str]:
    """`nmt serve` with both models, as a subprocess on a loopback port."""
    env = {"NMT_API_KEYS": None, "NMT_API_KEYS_FILE": None, "NMT_WARMUP": "false",
           "NMT_MAX_TEXTS": "16", "NMT_MAX_BEAM_SIZE": "4", "NMT_TORCH_THREADS": "1"}  # fmt: skip
    with serve_in_subprocess(f"{tiny_model_dir};{en_es_model_dir}", env) as (url, _):
        yield url


def v1(url: str, texts: list[str], **options: Any) -> list[str]:
    r = httpx.post(f"{url}/v1/translate", json={"text": texts, **options}, timeout=60)
    assert r.status_code == 200, r.text
    return [t["text"] for t in r.json()["translations"]]


# -- the real client ------------------------------------------------------------------------


def test_libretranslatepy_translates_detects_and_lists_languages(server: str) -> None:
    client = LibreTranslateAPI(server)
    text = "El gato come pan hoy."
    assert client.translate(text, "es", "en") == v1(server, [text])[0]
    english = "The cat eats bread today."
    assert client.translate(english, "en", "es") == v1(server, [english], source="en")[0]
    assert client.translate(english, "auto", "es") == v1(server, [english], source="en")[0]
    assert client.detect("El perro ve la luna hoy.")[0]["language"] == "es"
    assert client.detect("The dog sees the moon today.")[0]["language"] == "en"
    languages = {lang["code"]: lang for lang in client.languages()}
    assert languages["es"]["targets"] == ["en"] and languages["en"]["targets"] == ["es"]
    assert languages["es"]["name"] == "Spanish"


def test_list_input_and_auto_detection_per_text(server: str) -> None:
    texts = ["El gato come pan hoy.", "The girl has flowers.", "Mi amigo ve la luna."]
    r = httpx.post(f"{server}/translate", json={"q": texts, "source": "auto", "target": "en"})
    # "The girl has flowers." has no en -> en model: detection only considers Spanish
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["translatedText"] == v1(server, texts)
    assert [d["language"] for d in body["detectedLanguage"]] == ["es", "es", "es"]
    assert all(0 <= c <= 1 for c in body["confidence"])


def test_form_body_as_mastodon_sends_it(server: str) -> None:
    form = {"q": "El hombre quiere agua.", "source": "es", "target": "en", "format": "text"}
    r = httpx.post(f"{server}/translate", data=form)
    assert r.status_code == 200, r.text
    assert r.json()["translatedText"] == v1(server, ["El hombre quiere agua."])[0]
    raw = "q=El+gato+come+pan.&q=El+perro+ve+la+luna.&source=es&target=en"  # q repeated: a list
    r = httpx.post(f"{server}/translate", content=raw,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.json()["translatedText"] == v1(server, ["El gato come pan.", "El perro ve la luna."])


def test_alternatives_come_from_the_beam(server: str) -> None:
    body = {"q": "El gato come pan.", "source": "es", "target": "en", "alternatives": 2}
    r = httpx.post(f"{server}/translate", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["alternatives"]) == 2
    assert r.json()["translatedText"] not in r.json()["alternatives"]


PARAGRAPHS = [
    ["El gato come pan hoy.", "El perro ve la luna."],
    ["La niña tiene flores.", "Mi amigo busca un libro.", "La mujer quiere agua."],
    ["El hombre ve una casa."],
    ["Mi amigo tiene pan mañana.", "El perro busca agua ahora."],
    ["La luna.", "El gato ve flores hoy."],
]


def test_five_paragraphs_return_every_sentence_in_order_with_the_breaks(server: str) -> None:
    text = "\n\n".join(" ".join(p) for p in PARAGRAPHS)
    r = httpx.post(f"{server}/translate", json={"q": text, "source": "es", "target": "en"})
    assert r.status_code == 200, r.text
    expected = "\n\n".join(" ".join(v1(server, p)) for p in PARAGRAPHS)
    assert r.json()["translatedText"] == expected
    # the /v1 API gives the same with split: sentences
    assert v1(server, [text], split="sentences") == [expected]


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.append(self.get_starttag_text() or "")

    def handle_endtag(self, tag: str) -> None:
        self.tags.append(f"</{tag}>")


def _markup(document: str) -> list[str]:
    parser = _Markup()
    parser.feed(document)
    return parser.tags


def test_html_keeps_every_tag_and_attribute(server: str) -> None:
    post = ('<p class="status">El gato come pan. <a href="https://x.example/?a=1&amp;b=2" '
            'rel="nofollow noopener">El perro ve la luna.</a></p><p>Mi amigo&nbsp;tiene '
            "flores.<br></p><script>no traducir();</script>")  # fmt: skip
    body = {"q": [post, "<b>Hoy.</b>"], "source": "auto", "target": "en", "format": "html",
            "api_key": ""}  # fmt: skip
    r = httpx.post(f"{server}/translate", json=body)
    assert r.status_code == 200, r.text
    out, short = r.json()["translatedText"]
    assert _markup(out) == _markup(post)
    assert "<script>no traducir();</script>" in out
    inner = re.sub("<[^>]+>", "|", out).split("|")
    assert v1(server, ["El gato come pan."])[0] in inner[1]
    assert short == f"<b>{v1(server, ['Hoy.'])[0]}</b>"


# -- bad input in LibreTranslate's terms ------------------------------------------------------

BAD = [
    ({"q": "Hola.", "source": "es", "target": "fr"}, "es-en, en-es"),
    ({"q": "Hola.", "source": "auto", "target": "de"}, "no model translates into 'de'"),
    ({"q": "Hola.", "source": "es", "target": "en", "format": "pdf"}, "format must be"),
    ({"q": "Hola.", "source": "es", "target": "en", "alternatives": 4}, "at most 3 alternatives"),
    ({"q": "Hola.", "source": "es", "target": "en", "alternatives": "x"}, "alternatives must"),
    ({"q": "", "source": "es", "target": "en"}, "q: text is empty"),
    ({"q": [], "source": "es", "target": "en"}, "q is an empty list"),
    ({"q": ["Hola.", 3], "source": "es", "target": "en"}, "q[1] must be a string"),
    ({"source": "es", "target": "en"}, "missing q parameter"),
    ({"q": "Hola."}, "missing source parameter"),
    ({"q": "Hola.", "source": "es"}, "missing target parameter"),
    ({"q": "Hola.\x07", "source": "es", "target": "en"}, "control character"),
    ({"q": "Pan. " * 17, "source": "es", "target": "en"}, "17 sentences; at most 16"),
    ({"q": "x" * 1001, "source": "es", "target": "en"}, "1001 characters long; the limit is"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_input_is_a_400_saying_what_is_wrong(
    server: str, body: dict[str, Any], message: str
) -> None:
    r = httpx.post(f"{server}/translate", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert set(r.json()) == {"error"}


def test_bad_bodies_are_400_not_500(server: str) -> None:
    for content, kind in [(b"{not json", "application/json"), (b"[1]", "application/json"),
                          (b"\xff\xfe", "application/x-www-form-urlencoded"),
                          (b"x", "text/plain")]:  # fmt: skip
        r = httpx.post(f"{server}/translate", content=content, headers={"Content-Type": kind})
        assert r.status_code == 400 and "error" in r.json(), (content, r.text)


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


def test_api_key_missing_or_wrong_is_403(translator: Translator) -> None:
    app = create_app(settings_from(api_keys="secret-key"), translator=translator)
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        body = {"q": "Hola.", "source": "es", "target": "en"}
        r = client.post("/translate", data=body)
        assert r.status_code == 403 and "API key" in r.json()["error"]
        r = client.post("/translate", data={**body, "api_key": "wrong"})
        assert r.status_code == 403 and r.json() == {"error": "Invalid API key"}
        assert client.post("/translate", data={**body, "api_key": "secret-key"}).status_code == 200
        assert client.post("/detect", data={"q": "Hola.", "api_key": "wrong"}).status_code == 403
        assert client.get("/languages", params={"api_key": "secret-key"}).status_code == 200


# -- cache and confidence (the /v1 API) ------------------------------------------------------


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_cached_answers_equal_uncached_ones_and_are_counted(translator: Translator) -> None:
    app = create_app(settings_from(cache_size=100), translator=translator)
    body = {"text": ["El gato come pan.", "Hoy.", "El gato come pan."], "n_best": 2}
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        first = client.post("/v1/translate", json=body).json()["translations"]
        second = client.post("/v1/translate", json=body).json()["translations"]
        metrics = client.get("/metrics").text
    assert first == second and first[0] == first[2]
    assert _metric(metrics, "nmt_cache_misses_total") == 3
    assert _metric(metrics, "nmt_cache_hits_total") == 3
    assert _metric(metrics, "nmt_translated_texts_total") == 3  # the second request: no model
    off = create_app(settings_from(cache_size=0), translator=translator)
    with TestClient(off) as client:
        assert off.state.batcher.wait_ready(30)
        uncached = client.post("/v1/translate", json=body).json()["translations"]
        assert _metric(client.get("/metrics").text, "nmt_cache_hits_total") == 0
    # batch mates may differ, which moves scores in the 7th digit
    assert [t["text"] for t in uncached] == [t["text"] for t in first]
    for a, b in zip(uncached, first):
        assert [h["text"] for h in a["n_best"]] == [h["text"] for h in b["n_best"]]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_every_translation_carries_a_confidence_in_0_1(translator: Translator) -> None:
    app = create_app(settings_from(), translator=translator)
    with TestClient(app) as client:
        assert app.state.batcher.wait_ready(30)
        texts = ["El gato come pan.", "Hoy.", "xq zzv wkk qqq.", "La luna."]
        for t in client.post("/v1/translate", json={"text": texts}).json()["translations"]:
            assert 0 <= t["confidence"] <= 1


def test_served_models_are_listed_and_chosen(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()["models"]
    assert [(m["source"], m["target"], m["default"]) for m in models] == [
        ("es", "en", True), ("en", "es", False)]  # fmt: skip
    r = httpx.post(f"{server}/v1/translate", json={"text": "Hola.", "source": "fr"})
    assert r.status_code == 422 and "es-en, en-es" in r.json()["error"]["message"]
    by_name = v1(server, ["The cat."], model=models[1]["name"])
    assert by_name == v1(server, ["The cat."], source="en", target="es")
