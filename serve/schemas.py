"""Request and response models of the REST API; request models carry the configured limits.

The request model is built per app (`translate_request_model(settings)`), so that the limits in
the OpenAPI schema are the ones the server enforces. Bad input is a 422 before it reaches the
model; every error response has the shape of `ErrorResponse`.
"""

import re
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    create_model,
    model_validator,
)

from serve.settings import Settings

# C0 and C1 control characters except tab, and unpaired surrogates (which JSON can carry)
_BAD_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


# characters that render as nothing although their category says letter or symbol
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5")


def _invisible(char: str) -> bool:
    """Whitespace, format characters (zero-width space and joiners, BOM, bidi marks, ...),
    lone combining marks and variation selectors, and the few blank letters."""
    category = unicodedata.category(char)
    return category[0] in "ZC" or category in ("Mn", "Me") or char in _BLANK_LETTERS


def check_text(text: str) -> str:
    """One sentence of real text: not blank, no control characters, no unpaired surrogates."""
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    if all(_invisible(c) for c in text):
        raise ValueError(
            "text has no visible characters (only whitespace, zero-width or other invisible "
            f"characters such as U+{ord(next(c for c in text if not c.isspace())):04X})"
        )
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        char = bad.group()
        what = "an unpaired surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
        hint = "; send one sentence per text" if char in "\n\r" else ""
        raise ValueError(
            f"text contains {what} (U+{ord(char):04X}) at position {bad.start()}{hint}"
        )
    return text


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class TranslateRequestBase(BaseModel):
    """Texts and decoding options; subclassed per app with the configured limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: list[str]
    beam_size: int | None = None
    n_best: int = 1
    max_length: int | None = None
    return_alignments: bool = False

    @model_validator(mode="after")
    def _n_best_within_beam(self) -> "TranslateRequestBase":
        if self.beam_size is not None and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})")
        return self


def translate_request_model(settings: Settings) -> type[TranslateRequestBase]:
    """The request body of /v1/translate and /v1/translate/stream with `settings`' limits."""
    text_schema = {"type": "string", "minLength": 1, "maxLength": settings.max_chars}
    Text = Annotated[
        str,
        StringConstraints(min_length=1, max_length=settings.max_chars),
        AfterValidator(check_text),
    ]
    texts_type = Annotated[
        list[Text],
        BeforeValidator(_one_or_many),
        Field(min_length=1, max_length=settings.max_texts),
        WithJsonSchema(
            {
                "anyOf": [
                    text_schema,
                    {
                        "type": "array",
                        "items": text_schema,
                        "minItems": 1,
                        "maxItems": settings.max_texts,
                    },
                ],
                "title": "Text",
                "description": (
                    f"One sentence, or a list of up to {settings.max_texts} sentences, each "
                    f"1-{settings.max_chars} characters, not blank, without control characters "
                    "(tab excepted). Translations come back in the same order."
                ),
            }
        ),
    ]
    beam = settings.max_beam_size
    model = create_model(
        "TranslateRequest",
        __base__=TranslateRequestBase,
        __module__=__name__,
        text=(texts_type, ...),
        beam_size=(
            int | None,
            Field(
                None,
                ge=1,
                le=beam,
                description="Beam width; 1 is greedy search. Default: the model's own setting.",
            ),
        ),
        n_best=(
            int,
            Field(1, ge=1, le=beam, description="Hypotheses to return per text (<= beam_size)."),
        ),
        max_length=(
            int | None,
            Field(
                None,
                ge=1,
                le=settings.max_output_length,
                description="Most target subwords per translation. Default: from the "
                "source length, as the model was configured, and never more than "
                f"{settings.max_output_length}.",
            ),
        ),
        return_alignments=(
            bool,
            Field(False, description="Also return subwords and the attention matrix."),
        ),
    )
    model.model_config["json_schema_extra"] = {
        "examples": [{"text": ["Hola mundo.", "Buenos días."], "beam_size": 4, "n_best": 2}]
    }
    model.model_rebuild(force=True)
    return model


# -- responses -------------------------------------------------------------------------------


class Hypothesis(BaseModel):
    text: str
    score: float | None = Field(description="Length-penalised log-probability (higher is better).")


class Alignment(BaseModel):
    src_tokens: list[str] = Field(description="Source subwords.")
    tgt_tokens: list[str] = Field(
        description="Target subwords of the best translation, '</s>' last."
    )
    attention: list[list[float | None]] | None = Field(
        description="Attention weights rounded to 4 decimals, one row per target subword, one "
        "column per source subword; each row sums to 1. Null when the model does not produce "
        "attention; a weight that is not a finite number is null."
    )


class Translation(BaseModel):
    text: str = Field(description="The best translation.")
    score: float | None = Field(description="Its length-penalised log-probability.")
    finished: bool = Field(description="False when the output was cut at the maximum length.")
    n_best: list[Hypothesis] = Field(description="The best n_best hypotheses, best first.")
    alignment: Alignment | None = Field(
        None, description="Present when return_alignments was true."
    )


class TranslateResponse(BaseModel):
    request_id: str
    model: str = Field(description="The model's name.")
    translations: list[Translation] = Field(description="One per input text, in input order.")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="Where in the request, e.g. ['body', 'text', 2].")
    message: str
    type: str


class ErrorBody(BaseModel):
    status: int
    code: str = Field(
        description="Stable machine-readable code: invalid_request, unauthorized, not_found, "
        "method_not_allowed, payload_too_large, overloaded, not_ready, shutting_down, timeout, "
        "translation_failed, internal_error."
    )
    message: str = Field(description="What was wrong, naming the field and the limit.")
    request_id: str
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx response of the API has this body."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready", "loading", "failed", "restarting", "stopping"]
    error: str | None = None


class Limits(BaseModel):
    max_chars: int
    max_tokens: int = Field(description="Source subwords per text, after normalisation.")
    max_texts: int
    max_alignment_texts: int = Field(description="Texts per request with return_alignments.")
    max_beam_size: int
    max_output_length: int = Field(description="Output subwords per text, whatever is asked.")
    request_timeout_s: float


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    src_lang: str
    tgt_lang: str
    default_beam_size: int
    parameters: dict[str, int] = Field(description="Parameter counts per component.")
    config: dict[str, Any] = Field(
        description="The model's configuration: model, tokenizer and decode sections, languages."
    )
    scores: dict[str, Any] = Field(description="Scores recorded at training time (e.g. BLEU).")
    precision: str
    device: str
    limits: Limits
    batching: bool
    auth: bool = Field(description="Whether the API needs a key.")


class TokenEvent(BaseModel):
    """SSE `token` event: the detokenised translation so far (greedy single-text streams)."""

    index: int
    text: str


class DoneEvent(BaseModel):
    """SSE `done` event: the stream is complete."""

    request_id: str
    count: int
