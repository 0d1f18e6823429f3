"""The exported model directory's layout: file names, the manifest, and the graphs' tensors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = "nmt-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "export.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"

# the decoder state's tensors, in graph order, and the axis their batch rows are on
STATE_AXES = {"hidden": 1, "cell": 1, "attn_vector": 0}


class ExportedModelError(ValueError):
    """An exported model directory is missing a file, or one of its files is unreadable."""


@dataclass(frozen=True)
class GraphSpec:
    """Which optional tensors the graphs have: `keys` (all scores but dot), `cell` (LSTM)
    and `attn_vector` (Luong input feeding, of width `attn_vector_dim`)."""

    keys: bool
    cell: bool
    attn_vector: bool
    attn_vector_dim: int = 0

    @property
    def state(self) -> list[str]:
        """The decoder state's tensors, in the order the step graph takes them."""
        names = ["hidden"]
        if self.cell:
            names.append("cell")
        if self.attn_vector:
            names.append("attn_vector")
        return names

    @property
    def memory(self) -> list[str]:
        """The encoder memory's tensors, in the order the step graph takes them."""
        return ["enc_out", "keys", "src_mask"] if self.keys else ["enc_out", "src_mask"]

    @property
    def encoder_inputs(self) -> list[str]:
        return ["src", "src_lengths"]

    @property
    def encoder_outputs(self) -> list[str]:
        names = ["enc_out", "keys", "hidden"] if self.keys else ["enc_out", "hidden"]
        return names + (["cell"] if self.cell else [])

    @property
    def decoder_inputs(self) -> list[str]:
        return ["prev_tokens", *self.state, *self.memory]

    @property
    def decoder_outputs(self) -> list[str]:
        return ["log_probs", *(f"{name}_out" for name in self.state), "attn"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_exported_dir(path: str | Path) -> bool:
    """Whether `path` is an exported (ONNX) model directory: it has the manifest."""
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest of an exported directory, after checking that every file it needs is there.

    Raises:
        ExportedModelError: naming the missing or unreadable file.
    """
    if not model_dir.is_dir():
        raise ExportedModelError(f"exported model directory not found: {model_dir}")
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ExportedModelError(
            f"{model_dir} is not an exported model directory: {MANIFEST_FILE} is missing "
            "(`nmt export --model DIR --format onnx --out DIR2` writes one)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportedModelError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportedModelError(f"{path} is not an {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportedModelError(
            f"{path} has format version {manifest.get('version')}; this runtime reads "
            f"version {FORMAT_VERSION}: export the model again"
        )
    for name in [ENCODER_FILE, DECODER_FILE, CONFIG_FILE, *manifest.get("tokenizer", [])]:
        if not (model_dir / name).is_file():
            raise ExportedModelError(
                f"{model_dir} is incomplete: {name} is missing (export the model again)"
            )
    return manifest
