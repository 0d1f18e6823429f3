"""Request and response models of the REST API; request models carry the configured limits.

The request model is built per app (`translate_request_model(settings)`), so that the limits in
the OpenAPI schema are the ones the server enforces. Bad input is a 422 before it reaches the
model; every error response has the shape of `ErrorResponse`.
"""

import re
import unicodedata
from typing import Annotated, Any, ClassVar, Literal

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
_BAD_CHAR_IN_DOCUMENT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BREAK = re.compile(r"[\n\r]")


# characters that render as nothing although their category says letter or symbol
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5")


def _invisible(char: str) -> bool:
    """Whitespace, format characters (zero-width space and joiners, BOM, bidi marks, ...),
    lone combining marks and variation selectors, and the few blank letters."""
    category = unicodedata.category(char)
    return category[0] in "ZC" or category in ("Mn", "Me") or char in _BLANK_LETTERS


def check_document(text: str) -> str:
    """Real text that may hold several sentences and lines: `check_text` allowing line breaks."""
    return check_text(text, line_breaks=True)


def check_text(text: str, line_breaks: bool = False) -> str:
    """One sentence of real text: not blank, no control characters, no unpaired surrogates."""
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    if all(_invisible(c) for c in text):
        raise ValueError(
            "text has no visible characters (only whitespace, zero-width or other invisible "
            f"characters such as U+{ord(next(c for c in text if not c.isspace())):04X})"
        )
    bad = (_BAD_CHAR_IN_DOCUMENT if line_breaks else _BAD_CHAR).search(text)
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


Sampling = Literal["topk", "topp"]
Split = Literal["none", "sentences"]


def check_prefix(text: str) -> str:
    """A target prefix: may be empty, never control characters or unpaired surrogates."""
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        raise ValueError(
            f"target prefix contains U+{ord(bad.group()):04X} at position {bad.start()}"
        )
    return text


class TranslateRequestBase(BaseModel):
    """Texts and decoding options; subclassed per app with the configured limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: list[str]
    beam_size: int | None = None
    n_best: int = 1
    max_length: int | None = None
    return_alignments: bool = False
    length_penalty: float | None = None
    coverage_penalty: float | None = None
    min_length: int | None = None
    no_repeat_ngram: int | None = None
    sampling: Sampling | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    target_prefix: list[str] | None = None
    split: Split = "none"
    source: str | None = None
    target: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one_sentence_per_text_unless_split(self) -> "TranslateRequestBase":
        if self.split == "none":
            for i, text in enumerate(self.text):
                if (m := _LINE_BREAK.search(text)) is not None:
                    raise ValueError(
                        f"text.{i}: text contains a control character (U+{ord(m.group()):04X}) "
                        f"at position {m.start()}; send one sentence per text, or set split "
                        "to 'sentences'"
                    )
        else:
            if self.return_alignments:
                raise ValueError("return_alignments needs split 'none' (one sentence per text)")
            if self.target_prefix is not None and any(self.target_prefix):
                raise ValueError("target_prefix needs split 'none' (one sentence per text)")
        return self

    @model_validator(mode="after")
    def _one_prefix_per_text(self) -> "TranslateRequestBase":
        if self.target_prefix is not None and len(self.target_prefix) != len(self.text):
            raise ValueError(
                f"target_prefix has {len(self.target_prefix)} entries for {len(self.text)} texts; "
                "give one per text ('' for none)"
            )
        return self

    # request field -> nmt.search.SearchOptions field (the rules live there)
    SEARCH_FIELDS: ClassVar[dict[str, str]] = {
        "beam_size": "beam_size", "n_best": "n_best", "length_penalty": "length_penalty",
        "coverage_penalty": "coverage_penalty", "min_length": "min_len",
        "no_repeat_ngram": "no_repeat_ngram", "sampling": "sampling", "top_k": "top_k",
        "top_p": "top_p", "temperature": "temperature", "seed": "seed",
    }  # fmt: skip


def translate_request_model(settings: Settings) -> type[TranslateRequestBase]:
    """The request body of /v1/translate and /v1/translate/stream with `settings`' limits."""
    text_schema = {"type": "string", "minLength": 1, "maxLength": settings.max_chars}
    Text = Annotated[
        str,
        StringConstraints(min_length=1, max_length=settings.max_chars),
        AfterValidator(check_document),
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
                    "(tab excepted; line breaks only with split 'sentences'). Translations come "
                    "back in the same order."
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
            Field(
                False,
                description="Also return subwords and the attention matrix (at most "
                f"{settings.max_alignment_texts} texts per request).",
            ),
        ),
        length_penalty=(
            float | None,
            Field(None, ge=0, le=5, description="GNMT length penalty alpha. Default: the model's."),
        ),
        coverage_penalty=(
            float | None,
            Field(
                None, ge=0, le=5, description="GNMT coverage penalty beta. Default: the model's."
            ),
        ),
        min_length=(
            int | None,
            Field(
                None,
                ge=0,
                le=settings.max_output_length,
                description="No end of sentence before this many subwords.",
            ),
        ),
        no_repeat_ngram=(
            int | None,
            Field(None, ge=0, le=10, description="No n-gram of this order appears twice."),
        ),
        sampling=(
            Sampling | None,
            Field(
                None,
                description="Draw the translation instead of searching: from the top_k most "
                "likely subwords (topk) or the smallest set with probability >= top_p (topp); "
                "needs beam_size 1.",
            ),
        ),
        top_k=(int | None, Field(None, ge=0, le=1000, description="topk: 0 means all subwords.")),
        top_p=(float | None, Field(None, gt=0, le=1, description="topp: the nucleus mass.")),
        temperature=(float | None, Field(None, ge=0, le=10, description="Sampling temperature.")),
        seed=(
            int | None,
            Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible."),
        ),
        target_prefix=(
            Annotated[
                list[
                    Annotated[
                        str,
                        StringConstraints(max_length=settings.max_chars),
                        AfterValidator(check_prefix),
                    ]
                ],
                BeforeValidator(_one_or_many),
            ]
            | None,
            Field(
                None,
                description="Per text, the start its translation must have (one string per "
                "text, '' for none; a single string for a single text): the output starts with "
                "it verbatim and the model continues from it.",
            ),
        ),
        split=(
            Split,
            Field(
                "none",
                description="'none': each text is one sentence. 'sentences': a text may hold "
                "paragraphs; it is cut into sentences (at most "
                f"{settings.max_texts} in the request), all translated in one batch and put "
                "back together with the original line breaks and spacing.",
            ),
        ),
        source=(
            str | None,
            Field(None, max_length=16, description="Source language code: chooses the model."),
        ),
        target=(
            str | None,
            Field(None, max_length=16, description="Target language code: chooses the model."),
        ),
        model=(
            str | None,
            Field(
                None,
                max_length=200,
                description="A served model's name (GET /v1/models); default: the first.",
            ),
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
    score: float | None = Field(
        description="Its length-penalised log-probability (split texts: the sentences' mean)."
    )
    confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="How far to trust the translation, 0 to 1: the model's own scores, "
        "calibrated on its dev split to predict sentence chrF / 100 (split texts: the "
        "sentences' mean weighted by length).",
    )
    finished: bool = Field(description="False when the output was cut at the maximum length.")
    n_best: list[Hypothesis] = Field(description="The best n_best hypotheses, best first.")
    alignment: Alignment | None = Field(
        None, description="Present when return_alignments was true."
    )


class ServedModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    source: str = Field(description="Source language code.")
    target: str = Field(description="Target language code.")
    ready: bool
    generation: int = Field(description="How many times it was reloaded.")
    default: bool = Field(description="Used when a request names no model or languages.")


class ModelsResponse(BaseModel):
    models: list[ServedModelInfo]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str | None = Field(None, max_length=200, description="Default: every served model.")


class ReloadResponse(BaseModel):
    reloaded: list[str]
    models: list[ServedModelInfo]


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


# -- LibreTranslate-compatible endpoints (serve/libretranslate.py) ----------------------------


class LTTranslateRequest(BaseModel):
    """POST /translate, as JSON or as a form (application/x-www-form-urlencoded)."""

    q: str | list[str] = Field(description="The text (paragraphs allowed), or a list of texts.")
    source: str = Field("auto", description="Source language code, or 'auto' to detect it.")
    target: str = Field(description="Target language code.")
    format: str = Field("text", description="'text' or 'html' (markup kept, text translated).")
    alternatives: int = Field(0, description="Other translations to return per text.")
    api_key: str | None = Field(None, description="The API key, when the server needs one.")


class LTDetectedLanguage(BaseModel):
    confidence: float = Field(description="0 to 100.")
    language: str


class LTTranslateResponse(BaseModel):
    translatedText: str | list[str]  # noqa: N815 - LibreTranslate's field names
    alternatives: list[str] | list[list[str]] | None = None
    detectedLanguage: LTDetectedLanguage | list[LTDetectedLanguage] | None = None  # noqa: N815
    confidence: float | list[float | None] | None = Field(
        None, description="Our addition: how far to trust each translation, 0 to 1."
    )


class LTLanguage(BaseModel):
    code: str
    name: str
    targets: list[str]


class LTDetectRequest(BaseModel):
    q: str = Field(description="The text whose language is wanted.")
    api_key: str | None = None


class LTError(BaseModel):
    """Every error of the LibreTranslate-compatible endpoints has this body."""

    error: str
