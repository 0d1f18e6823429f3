"""Schemathesis fuzzes every operation of the OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nmt.translate import Translator
from serve.app import create_app
from serve.runner import serve_in_thread
from serve.settings import settings_from

# small limits keep each generated request quick on the tiny model
LIMITS: dict[str, Any] = {
    "max_chars": 40,
    "max_texts": 4,
    "max_beam_size": 4,
    "max_output_length": 16,
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _no_model() -> Any:
    raise AssertionError("the schema is read without loading a model")


SPEC = create_app(settings_from(**LIMITS), load=_no_model).openapi()
# negative cases need something to break: the POST bodies (GET operations take no input)
CASES = [
    (method.upper(), path, mode)
    for path, ops in SPEC["paths"].items()
    for method in ops
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "post" or mode == GenerationMode.POSITIVE
]


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    app = create_app(settings_from(**LIMITS), translator=Translator.load(tiny_model_dir))
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_generated_request_gets_a_server_error(
    base_url: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = schemathesis.openapi.from_dict(SPEC)[path][method]
    # bounded: translating is the slow part, so fewer valid bodies than invalid ones
    examples = {"GET": 3, "POST": 20 if mode == GenerationMode.POSITIVE else 30}[method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

    check()
