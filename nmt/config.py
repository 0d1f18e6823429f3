"""Configuration: frozen dataclasses loaded from YAML, validated at load time, with --set overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

MAX_LAYERS = 8


class ConfigError(ValueError):
    """A configuration value is missing, misspelt or cannot work; the message names the field."""


@dataclass(frozen=True)
class DataConfig:
    corpus: str | None = "data/bible-es-en"  # folder with {train,dev,test}.<lang>
    src_lang: str = "es"
    tgt_lang: str = "en"
    train_src: str | None = None  # explicit file pair, instead of corpus/train.<lang>
    train_tgt: str | None = None
    dev_src: str | None = None
    dev_tgt: str | None = None
    max_tokens: int = 200  # pairs longer than this (in subwords, either side) are dropped
    max_length_ratio: float = 3.0  # pairs whose token lengths differ more than this are dropped
    cache_dir: str | None = None  # encoded-corpus cache; default: <run_dir>/cache
    # padded lengths: at most this many, fitted to the corpus's length distribution to keep
    # padding low with few distinct shapes; 0 rounds lengths up to multiples of 8 instead
    max_buckets: int = 16


@dataclass(frozen=True)
class TokenizerConfig:
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = 8000  # per side when not joint
    joint: bool = True
    character_coverage: float = 1.0
    # sentences sampled to train SentencePiece: its trainer holds them in memory, about 2.5 KB a
    # sentence (1M: ~2.5 GB peak at 5M pairs), and more than a million adds little to the vocabulary
    input_sentence_size: int = 1_000_000


@dataclass(frozen=True)
class EncoderConfig:
    # gnmt: only the bottom layer is bidirectional; bi: every layer; uni: none, so the encoding
    # of a source prefix never changes when more source arrives (simultaneous translation)
    layout: Literal["gnmt", "bi", "uni"] = "gnmt"
    num_layers: int = 2
    hidden_dim: int = 256  # per direction
    residual_from: int = 2  # 0-based: layers at this index and above compute x + layer(x)
    dropout: float = 0.2  # between layers
    variational: bool = False  # one dropout mask per sequence, shared across time
    # custom cells only (lstm_ln, lstm_peephole, lstm_cifg): dropout on h_{t-1} in the recurrent
    # product, one mask per sequence (Gal & Ghahramani, 2016), and DropConnect on W_hh, one mask
    # per batch (AWD-LSTM)
    dropout_recurrent: float = 0.0
    weight_drop: float = 0.0


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 2
    hidden_dim: int = 512
    residual_from: int = 2
    dropout: float = 0.2
    variational: bool = False
    dropout_recurrent: float = 0.0  # as in EncoderConfig
    weight_drop: float = 0.0
    bridge: Literal["dense", "zero"] = "dense"  # initial decoder state from the encoder, or zeros
    input_feeding: bool = False  # Luong: feed the previous attentional vector with the next token


@dataclass(frozen=True)
class AttentionConfig:
    # bahdanau: additive scores from the previous decoder state (Bahdanau et al., 2015)
    # luong: scores from the top layer's current output (Luong et al., 2015)
    # gnmt: the bottom decoder layer attends, the context feeds every upper layer (Wu et al., 2016)
    type: Literal["bahdanau", "luong", "gnmt"] = "luong"
    score: Literal["additive", "dot", "general", "concat"] = "general"
    dim: int = 0  # hidden width of additive/concat scoring; 0 means the decoder width


@dataclass(frozen=True)
class ModelConfig:
    # lstm, gru: the fused nn.LSTM / nn.GRU kernels; lstm_ln (layer-normalised), lstm_peephole,
    # lstm_cifg (coupled input-forget gate): our recurrence layer, nmt/model/cells.py
    cell: Literal["lstm", "gru", "lstm_ln", "lstm_peephole", "lstm_cifg"] = "lstm"
    embed_dim: int = 256
    share_embeddings: bool = True  # one source/target embedding; needs a joint vocabulary
    tie_output: bool = True  # output projection shares the target embedding matrix
    embed_dropout: float = 0.1
    # target: the softmax covers only the tokens seen on the target side of the training data
    # (a joint vocabulary holds many source-only pieces); full: every token of the vocabulary
    output_vocab: Literal["target", "full"] = "target"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    momentum: float = 0.0  # sgd
    weight_decay: float = 0.0
    # linear, cosine: decay to min_lr exactly at the end of training: the max_minutes deadline
    # when set (planned on the training clock), else max_steps (see nmt/schedule.py)
    schedule: Literal["constant", "inverse_sqrt", "exponential", "plateau", "linear", "cosine"] = (
        "inverse_sqrt"
    )
    warmup_steps: int = 500
    decay_rate: float = 0.5  # exponential: lr *= decay_rate every decay_steps after warmup
    decay_steps: int = 2000
    plateau_factor: float = 0.5  # plateau: lr *= factor after plateau_patience validations
    plateau_patience: int = 2
    min_lr: float = 1e-5
    clip_norm: float = 1.0  # 0 disables clipping
    batch_tokens: int = 4096  # target tokens per batch, padding included
    accum_steps: int = 1
    label_smoothing: float = 0.1
    scheduled_sampling: float = 0.0  # max probability of feeding the model's own prediction
    scheduled_sampling_steps: int = 10000  # linear ramp to that probability
    max_steps: int = 0  # 0: no limit
    max_epochs: int = 0
    max_minutes: float = 0.0
    valid_every: int = 500  # steps
    # validate by the training clock instead of steps (0: use valid_every); the interval grows so
    # that validation stays under 5% of the time it measures itself taking
    valid_every_minutes: float = 0.0
    valid_beam_size: int = 1  # 1 = greedy
    valid_max_sentences: int = 0  # 0: the whole dev set
    test_at_end: bool = True  # score the corpus's test split once, for the model card only
    log_every: int = 50
    keep_checkpoints: int = 5
    # also checkpoint on the training clock, so a kill -9 or a power cut loses at most this much
    # work (SIGTERM and SIGINT always save first); 0: only at validations. Such a checkpoint is
    # deleted when the next one is written, so it never displaces a validated one.
    save_every_minutes: float = 5.0
    # the shipped model is the best on dev BLEU of: the best validated weights, the last ones, the
    # average of the last `average_last` checkpoints (0: not tried) and the moving average of the
    # weights with this decay (0: not kept)
    average_last: int = 0
    ema_decay: float = 0.0
    early_stopping: int = 0  # stop after this many validations without improvement; 0 disables
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    nan_policy: Literal["stop", "skip"] = "stop"
    num_threads: int = 0  # torch intra-op threads on CPU; 0: torch's default
    # how the gate math and the loss's softmax run on the CPU: `eager` (plain tensor code),
    # `compiled` (lstm_ln / lstm_peephole / lstm_cifg only: torch.compile, one generated kernel
    # per step; needs a C++ compiler, ~15 s at every start), `native` (C++ kernels, built once
    # per machine in about a minute and cached, needing a C++ compiler and ninja: one per step
    # for the gate math of lstm_ln, and of lstm in the input-feeding decoder and the training
    # encoder, one for the attention's per-row products, one per block for the loss's softmax)
    # or `auto` (native on a CPU where they build, else eager)
    cell_kernels: Literal["auto", "eager", "compiled", "native"] = "auto"
    compile_cells: bool = False  # older spelling of cell_kernels: compiled
    # wait-k training (Ma et al., 2019): target step t attends to the first t + k source tokens
    # only. k, or [lo, hi] to draw k from that range so one model serves every k (Elbayad et
    # al., 2020); null: full-sentence training. Needs model.encoder.layout: uni.
    wait_k: int | tuple[int, int] | None = None
    # with a range: one k per batch (`batch`, as Elbayad et al.), or one per sentence
    # (`sentence`: every batch mixes the k's)
    wait_k_sampling: Literal["batch", "sentence"] = "batch"


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 5
    length_penalty: float = 0.6  # GNMT alpha: ((5 + |Y|) / 6) ** alpha
    coverage_penalty: float = 0.0  # GNMT beta
    max_len_a: float = 0.0  # max output length a * |source| + b; 0 derives a from the data
    max_len_b: int | None = None  # None derives b from the data
    min_len: int = 0
    no_repeat_ngram: int = 0
    batch_tokens: int = 6000  # source tokens per decoding batch


@dataclass(frozen=True)
class Config:
    name: str = "model"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict dumps to YAML/JSON cleanly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


T = TypeVar("T")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against the type hint `hint` and converts it (lists to tuples, ints to floats)."""
    origin = get_origin(hint)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Builds and validates a Config; unknown keys and impossible combinations raise ConfigError."""
    cfg = _build(Config, values or {}, "")
    validate(cfg)
    return cfg


def _set_path(values: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `key.sub=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(values, key.strip(), raw.strip())
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML config file (or the defaults when `path` is None) and applies overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        values = loaded or {}
    apply_overrides(values, overrides or [])
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from err


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _layer_widths(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Input and output width of every encoder layer."""
    enc = cfg.encoder
    inputs, outputs = [], []
    width = cfg.embed_dim
    for i in range(enc.num_layers):
        bidirectional = enc.layout == "bi" or (i == 0 and enc.layout == "gnmt")
        out = enc.hidden_dim * (2 if bidirectional else 1)
        inputs.append(width)
        outputs.append(out)
        width = out
    return inputs, outputs


def encoder_output_dim(cfg: ModelConfig) -> int:
    """Width of the encoder's top layer output (the attention memory)."""
    return _layer_widths(cfg)[1][-1]


def validate(cfg: Config) -> None:
    """Rejects combinations that cannot work, naming the field."""
    m, enc, dec, att = cfg.model, cfg.model.encoder, cfg.model.decoder, cfg.model.attention
    for name, value in [
        ("model.embed_dim", m.embed_dim),
        ("model.encoder.hidden_dim", enc.hidden_dim),
        ("model.decoder.hidden_dim", dec.hidden_dim),
        ("tokenizer.vocab_size", cfg.tokenizer.vocab_size),
        ("train.batch_tokens", cfg.train.batch_tokens),
        ("train.accum_steps", cfg.train.accum_steps),
        ("decode.beam_size", cfg.decode.beam_size),
        ("data.max_tokens", cfg.data.max_tokens),
    ]:
        _check(value > 0, f"{name} must be positive, got {value}")
    for name, layers in [
        ("model.encoder.num_layers", enc.num_layers),
        ("model.decoder.num_layers", dec.num_layers),
    ]:
        _check(
            1 <= layers <= MAX_LAYERS, f"{name} must be between 1 and {MAX_LAYERS}, got {layers}"
        )
    for name, p in [
        ("model.encoder.dropout", enc.dropout),
        ("model.decoder.dropout", dec.dropout),
        ("model.embed_dropout", m.embed_dropout),
        ("train.label_smoothing", cfg.train.label_smoothing),
        ("train.scheduled_sampling", cfg.train.scheduled_sampling),
        ("model.encoder.dropout_recurrent", enc.dropout_recurrent),
        ("model.decoder.dropout_recurrent", dec.dropout_recurrent),
        ("model.encoder.weight_drop", enc.weight_drop),
        ("model.decoder.weight_drop", dec.weight_drop),
    ]:
        _check(0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p}")
    for side, section in [("encoder", enc), ("decoder", dec)]:
        for option in ("dropout_recurrent", "weight_drop"):
            _check(
                m.cell not in ("lstm", "gru") or getattr(section, option) == 0,
                f"model.{side}.{option}={getattr(section, option)} does not apply to "
                f"model.cell={m.cell!r}: the fused nn.{m.cell.upper()} kernel cannot apply it; "
                "use cell lstm_ln, lstm_peephole or lstm_cifg, or set it to 0",
            )
    _check(
        not cfg.train.compile_cells or m.cell not in ("lstm", "gru"),
        f"train.compile_cells applies to the cells on our recurrence layer (lstm_ln, "
        f"lstm_peephole, lstm_cifg), not to model.cell={m.cell!r}, which runs on fused kernels",
    )
    kernels = cfg.train.cell_kernels
    _check(
        kernels != "compiled" or m.cell not in ("lstm", "gru"),
        f"train.cell_kernels={kernels} applies to the cells on our recurrence layer (lstm_ln, "
        f"lstm_peephole, lstm_cifg), not to model.cell={m.cell!r}, which runs on fused kernels",
    )
    _check(
        not cfg.train.compile_cells or kernels != "native",
        "train.compile_cells and train.cell_kernels=native contradict each other: keep one",
    )
    _check(
        cfg.tokenizer.vocab_size >= 16,
        f"tokenizer.vocab_size is too small: {cfg.tokenizer.vocab_size}",
    )

    inputs, outputs = _layer_widths(m)
    for i in range(max(enc.residual_from, 0), enc.num_layers):
        _check(
            inputs[i] == outputs[i],
            f"model.encoder.residual_from={enc.residual_from}: encoder layer {i} maps width "
            f"{inputs[i]} to {outputs[i]}, so it cannot be residual; start residuals at a later layer",
        )
    _check(enc.residual_from >= 0, "model.encoder.residual_from must be >= 0")
    _check(
        dec.residual_from >= 1 or dec.num_layers == 1 or m.embed_dim == dec.hidden_dim,
        f"model.decoder.residual_from={dec.residual_from}: the bottom decoder layer maps the "
        f"embedding width {m.embed_dim} to {dec.hidden_dim}; start residuals at layer 1 or later",
    )

    if att.type == "bahdanau":
        _check(
            att.score in ("additive", "concat"),
            f"model.attention.score={att.score!r}: Bahdanau attention is additive; use 'additive'",
        )
    if att.score == "dot":
        _check(
            encoder_output_dim(m) == dec.hidden_dim,
            f"model.attention.score='dot' needs the encoder output width ({encoder_output_dim(m)}) "
            f"to equal model.decoder.hidden_dim ({dec.hidden_dim}); use 'general' instead",
        )
    _check(
        not (dec.input_feeding and att.type != "luong"),
        f"model.decoder.input_feeding applies to Luong attention only (attention.type={att.type!r})",
    )
    _check(att.dim >= 0, "model.attention.dim must be >= 0")
    if m.share_embeddings:
        _check(
            cfg.tokenizer.joint,
            "model.share_embeddings needs a joint vocabulary (tokenizer.joint: true)",
        )
    _check(
        cfg.data.corpus is not None or bool(cfg.data.train_src and cfg.data.train_tgt),
        "data: give data.corpus (a prepared folder) or both data.train_src and data.train_tgt",
    )
    _check(cfg.train.valid_every > 0, "train.valid_every must be positive")
    _check(cfg.data.max_buckets >= 0, "data.max_buckets must be >= 0 (0: multiples of 8)")
    tc = cfg.train
    _check(tc.valid_every_minutes >= 0, "train.valid_every_minutes must be >= 0")
    _check(
        tc.save_every_minutes >= 0,
        f"train.save_every_minutes must be >= 0 (0: only at validations), got {tc.save_every_minutes}",
    )
    _check(0.0 <= tc.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {tc.ema_decay}")
    _check(
        0 <= tc.average_last <= tc.keep_checkpoints,
        f"train.average_last ({tc.average_last}) must be between 0 and train.keep_checkpoints "
        f"({tc.keep_checkpoints}): only kept checkpoints can be averaged",
    )
    _check(
        tc.schedule not in ("linear", "cosine") or tc.max_minutes > 0 or tc.max_steps > 0,
        f"train.schedule={tc.schedule!r} decays to the end of training: set train.max_minutes "
        "or train.max_steps",
    )
    _check(tc.min_lr < tc.lr, f"train.min_lr ({tc.min_lr}) must be below train.lr ({tc.lr})")
    _check(cfg.train.log_every > 0, "train.log_every must be positive")
    if tc.wait_k is not None:
        low, high = (tc.wait_k, tc.wait_k) if isinstance(tc.wait_k, int) else tc.wait_k
        _check(
            1 <= low <= high,
            f"train.wait_k must be k >= 1 or a range [lo, hi] with 1 <= lo <= hi, got {tc.wait_k}",
        )
        _check(
            enc.layout == "uni",
            f"train.wait_k needs model.encoder.layout: uni (got {enc.layout!r}): a bidirectional "
            "layer reads source the decoder has not been allowed to see yet",
        )
        _check(
            tc.scheduled_sampling == 0,
            "train.wait_k does not combine with train.scheduled_sampling; set one of them to 0",
        )
    _check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1")
    _check(cfg.train.lr > 0, f"train.lr must be positive, got {cfg.train.lr}")


def replace(cfg: T, **changes: Any) -> T:
    """dataclasses.replace, re-exported for convenience."""
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
