"""Service settings: model, limits, batching, auth and CORS, read from `NMT_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


def _split_list(value: Any) -> Any:
    """'a, b,,c' -> ['a', 'b', 'c']; lists pass through."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_api_key(key: str, where: str) -> str:
    """A key as the server can match it: printable ASCII without spaces (HTTP headers carry
    bytes, and clients disagree on how to encode anything else)."""
    bad = next((c for c in key if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise ValueError(
            f"{where}: an API key contains {'a space' if bad == ' ' else f'U+{ord(bad):04X}'}; "
            "keys must be printable ASCII without spaces"
        )
    return key


class _EmptyKeySettings(PydanticBaseSettingsSource):
    """Reports NMT_API_KEYS / NMT_API_KEYS_FILE set to an empty value, which the env source
    ignores like every empty variable: a key setting that yields no key must fail, not turn
    auth off (`NMT_API_KEYS=${UNSET_VARIABLE}` in a compose file)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {}
        for name in ("api_keys", "api_keys_file"):
            value = os.environ.get(f"NMT_{name.upper()}")
            if value is not None and not value.strip():
                found[name] = ""
        return found


class Settings(BaseSettings):
    """Everything the service can be told; each field `x` is read from the variable `NMT_X`."""

    model_config = SettingsConfigDict(
        env_prefix="NMT_",
        env_ignore_empty=True,  # NMT_X= (empty) means the default, except for the key settings
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # -- the model ----------------------------------------------------------------------------
    # a model dir written by `nmt train`; "A,B": an ensemble; "A;B": two served models
    model_dir: str | Path | None = None
    device: str = "cpu"  # cpu, cuda, cuda:1 or auto
    precision: Literal["fp32", "bf16"] = "fp32"
    # the live route's own model copy: bf16 keeps its weights in bf16 (half the memory each of
    # its small batched steps reads); unset: as `precision`
    live_precision: Literal["fp32", "bf16"] | None = None
    live_drafts: bool = True  # live route: write each sentence's end ahead while idle (False: off)
    quantize: bool = False  # removed: int8 runs in ONNX Runtime (serve an `nmt export --int8` dir)
    torch_threads: int = Field(default=0, ge=0)  # intra-op CPU threads; 0: torch's default
    warmup: bool = True  # translate one sentence before reporting ready (builds CPU kernels)

    # -- limits on one request ----------------------------------------------------------------
    max_chars: int = Field(default=1000, ge=1)  # characters per text
    max_texts: int = Field(default=64, ge=1)  # texts per request
    max_body_bytes: int = Field(default=1_000_000, ge=1024)  # request body size; larger gets 413
    max_beam_size: int = Field(default=16, ge=1)  # also the largest n_best
    max_output_length: int = Field(default=512, ge=1)  # hard cap on output subwords, asked or not
    max_tokens: int = Field(default=400, ge=1)  # source subwords per text, after normalisation
    max_alignment_texts: int = Field(default=8, ge=1)  # texts per request with return_alignments
    request_timeout_s: float = Field(default=60.0, gt=0)  # queueing + translation; later gets 504
    cache_size: int = Field(default=10000, ge=0)  # sentences in the translation cache; 0: off

    # -- dynamic batching ---------------------------------------------------------------------
    batching: bool = True  # False: each request is translated on its own (for comparisons)
    batch_tokens: int = Field(default=16384, ge=1)  # work per batch: longest source x texts x beams
    batch_wait_ms: float = Field(default=5.0, ge=0)  # how long the oldest request waits for company
    max_queue: int = Field(default=1024, ge=1)  # texts waiting; beyond it requests get 503
    retry_after_s: int = Field(default=1, ge=1)  # Retry-After on 503
    restart_delay_s: float = Field(default=1.0, ge=0)  # pause before a crashed worker restarts
    load_retry_s: float = Field(default=0.0, ge=0)  # 0: exit if the model fails to load; else retry

    # -- connections (uvicorn) ----------------------------------------------------------------
    max_concurrent_requests: int = Field(default=2048, ge=1)  # in flight; beyond it 503
    max_connections: int = Field(default=4096, ge=1)  # uvicorn's limit_concurrency
    keep_alive_s: float = Field(default=5.0, gt=0)  # idle keep-alive connections are closed
    graceful_shutdown_s: float = Field(default=20.0, gt=0)  # then open requests are cut off

    # -- security -----------------------------------------------------------------------------
    api_keys: Annotated[list[str] | None, NoDecode] = None  # comma-separated; unset: no auth
    api_keys_file: Path | None = None  # one key per line ('#' comments allowed)
    admin_keys: Annotated[list[str], NoDecode] = []  # comma-separated; unset: no /v1/admin routes
    docs: Literal["protected", "public", "off"] = "protected"  # /docs, /redoc, /openapi.json
    cors_origins: Annotated[list[str], NoDecode] = []  # comma-separated; empty: no CORS

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _admin_keys(cls, value: Any) -> Any:
        return [check_api_key(k, "NMT_ADMIN_KEYS") for k in _split_list(value)]

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if value is None:
            return None
        keys = _split_list(value)
        if not keys:
            raise ValueError(
                "NMT_API_KEYS is set but holds no key; give at least one key, or unset it to "
                "run without authentication"
            )
        return [check_api_key(k, "NMT_API_KEYS") for k in keys]

    @property
    def auth_configured(self) -> bool:
        """Whether a key setting is present (then it must yield keys)."""
        return self.api_keys is not None or self.api_keys_file is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        empty = _EmptyKeySettings(settings_cls)
        return (init_settings, env_settings, empty, dotenv_settings, file_secret_settings)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue < self.max_texts:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_texts ({self.max_texts}), "
                "or a full-size request could never be queued"
            )
        if self.quantize:
            raise ValueError(
                "NMT_QUANTIZE was removed: int8 runs in ONNX Runtime now; export the model with "
                "`nmt export --model DIR --format onnx --int8 --out DIR2` and serve DIR2"
            )
        return self

    def all_api_keys(self) -> list[str]:
        """Keys from NMT_API_KEYS and NMT_API_KEYS_FILE together; empty means auth is off.

        Raises ValueError when a key setting is present but yields no key, or a key cannot be
        matched (non-ASCII): the server must not start with auth silently off."""
        keys = list(self.api_keys or [])
        if self.api_keys_file is not None:
            path = Path(self.api_keys_file)
            if not path.is_file():
                shown = "(empty)" if str(path) == "." else str(path)
                raise ValueError(f"NMT_API_KEYS_FILE: {shown} is not a readable file")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"NMT_API_KEYS_FILE: cannot read {path}: {err}") from None
            file_keys = []
            for number, line in enumerate(text.split("\n"), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    file_keys.append(check_api_key(line, f"{path}, line {number}"))
            if not file_keys:
                raise ValueError(
                    f"NMT_API_KEYS_FILE: {path} holds no key (empty or only comments); add keys "
                    "or unset it to run without authentication"
                )
            keys += file_keys
        return keys


class _ArgumentsOnly(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from(**values: Any) -> Settings:
    """Settings from these values and the defaults only, ignoring NMT_* variables (tests, embedding)."""
    return _ArgumentsOnly(**values)
