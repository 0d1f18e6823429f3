"""Service settings: model, limits, batching, auth and CORS, read from `NMT_*` environment variables."""

from __future__ import annotations

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


class Settings(BaseSettings):
    """Everything the service can be told; each field `x` is read from the variable `NMT_X`."""

    model_config = SettingsConfigDict(
        env_prefix="NMT_",
        env_ignore_empty=True,  # NMT_API_KEYS= (empty) means the default: no keys
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # -- the model ----------------------------------------------------------------------------
    model_dir: Path | None = None  # a model directory written by `nmt train`
    device: str = "cpu"  # cpu, cuda, cuda:1 or auto
    precision: Literal["fp32", "bf16"] = "fp32"
    quantize: bool = False  # int8 dynamic quantisation (CPU)
    torch_threads: int = Field(default=0, ge=0)  # intra-op CPU threads; 0: torch's default
    warmup: bool = True  # translate one sentence before reporting ready (builds CPU kernels)

    # -- limits on one request ----------------------------------------------------------------
    max_chars: int = Field(default=1000, ge=1)  # characters per text
    max_texts: int = Field(default=64, ge=1)  # texts per request
    max_body_bytes: int = Field(default=1_000_000, ge=1024)  # request body size; larger gets 413
    max_beam_size: int = Field(default=16, ge=1)  # also the largest n_best
    max_output_length: int = Field(default=512, ge=1)  # largest `max_length` a client may ask for
    request_timeout_s: float = Field(default=60.0, gt=0)  # queueing + translation; later gets 504

    # -- dynamic batching ---------------------------------------------------------------------
    batching: bool = True  # False: each request is translated on its own (for comparisons)
    batch_tokens: int = Field(default=4096, ge=1)  # padded source tokens in one batch
    batch_wait_ms: float = Field(default=5.0, ge=0)  # how long the oldest request waits for company
    max_queue: int = Field(default=1024, ge=1)  # texts waiting; beyond it requests get 503
    retry_after_s: int = Field(default=1, ge=1)  # Retry-After on 503

    # -- security -----------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = []  # comma-separated; empty: no auth
    api_keys_file: Path | None = None  # one key per line ('#' comments allowed)
    cors_origins: Annotated[list[str], NoDecode] = []  # comma-separated; empty: no CORS

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue < self.max_texts:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_texts ({self.max_texts}), "
                "or a full-size request could never be queued"
            )
        return self

    def all_api_keys(self) -> list[str]:
        """Keys from NMT_API_KEYS and NMT_API_KEYS_FILE together; empty means auth is off."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in Path(self.api_keys_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
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
