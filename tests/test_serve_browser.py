"""The web page in a real headless browser: type a sentence, see its translation and attention.

Runs with `pytest -m slow`; needs Debian's chromium (`bash serve/install_browser.sh`) and the
`playwright` package, which drives that browser and never downloads one of its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nmt.translate import Translator
from serve.app import create_app
from serve.runner import serve_in_thread
from serve.settings import settings_from

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: run `bash serve/install_browser.sh`")
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package is not installed (pip install -e '.[dev]')",
    )
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir)


def test_page_translates_a_typed_sentence_with_n_best_and_attention(
    browser: Any, translator: Translator
) -> None:
    app = create_app(settings_from(), translator=translator)
    with serve_in_thread(app) as url:
        expected = httpx.post(
            f"{url}/v1/translate",
            json={"text": "El perro tiene agua.", "beam_size": 3, "n_best": 3},
        ).json()["translations"][0]
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url + "/", wait_until="domcontentloaded")
        page.wait_for_selector("#model-line:has-text('es → en')", timeout=15_000)
        page.fill("#beam-size", "3")
        page.fill("#n-best", "3")
        page.fill("#source", "El perro tiene agua.")
        page.click("#translate")
        page.wait_for_selector("#status:has-text('Done')", timeout=30_000)
        assert page.inner_text(".result .translation-text") == expected["text"]
        nbest = page.locator(".result .nbest li").all_inner_texts()
        assert len(nbest) == 3 and nbest[0].startswith(expected["text"])
        canvas = page.locator(".result canvas.heatmap")
        assert canvas.is_visible()
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 50 and box["height"] > 50
        assert errors == []
        page.close()


def test_page_streams_a_single_sentence_greedily(browser: Any, translator: Translator) -> None:
    app = create_app(settings_from(), translator=translator)
    with serve_in_thread(app) as url:
        greedy = translator.translate(
            ["El gato come pan hoy."], translator.with_options(beam_size=1)
        )[0].text
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#model-line:has-text('es → en')", timeout=15_000)
        page.uncheck("#alignments")
        page.check("#stream")
        page.fill("#source", "El gato come pan hoy.")
        page.press("#source", "Control+Enter")
        page.wait_for_selector("#status:has-text('Done')", timeout=30_000)
        assert page.inner_text(".result .translation-text") == greedy
        page.close()


def test_page_sends_the_starts_with_box_as_a_target_prefix(
    browser: Any, translator: Translator
) -> None:
    app = create_app(settings_from(), translator=translator)
    prefix = "The dog"
    with serve_in_thread(app) as url:
        expected = translator.translate(
            ["El gato come pan hoy."], translator.with_options(beam_size=2), prefixes=[prefix]
        )[0].text
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#model-line:has-text('es → en')", timeout=15_000)
        page.fill("#beam-size", "2")
        page.fill("#n-best", "1")
        page.fill("#prefix", prefix)
        page.fill("#source", "El gato come pan hoy.")
        page.click("#translate")
        page.wait_for_selector("#status:has-text('Done')", timeout=30_000)
        shown = page.inner_text(".result .translation-text")
        assert shown == expected and shown.startswith(prefix)
        page.close()


def test_page_asks_for_the_api_key_when_the_server_needs_one(
    browser: Any, translator: Translator
) -> None:
    app = create_app(settings_from(api_keys="page-key"), translator=translator)
    with serve_in_thread(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#auth-panel:visible", timeout=15_000)
        page.fill("#source", "Una casa.")
        page.click("#translate")
        page.wait_for_selector("#status.error:has-text('missing or invalid API key')")
        page.fill("#api-key", "page-key")
        # the page could not read the model's defaults without the key: it asks with the beam
        # and n-best of its form
        beam = int(page.input_value("#beam-size"))
        n_best = int(page.input_value("#n-best"))
        page.click("#translate")
        page.wait_for_selector("#status:has-text('Done')", timeout=30_000)
        expected = translator.translate(
            ["Una casa."], translator.with_options(beam_size=beam, n_best=n_best)
        )[0].text
        assert page.inner_text(".result .translation-text") == expected
        page.close()
