"""Run directories, model directories and checkpoints: atomic saves, safe loads, averaging.

A run directory looks like this::

    run/
      config.yaml            the resolved config of the run
      tokenizer/             SentencePiece model(s), trained once on the training split
      model/                 the best model so far (by dev BLEU): everything needed to translate
        config.yaml  spm*.model  model.safetensors  meta.json  README.md
      checkpoints/step-00001000/   model.safetensors, state.pt (optimizer, RNG, data position, ...)
      metrics.jsonl  curves.png  tensorboard/

Every file is written to a temporary name and renamed into place, and a checkpoint directory is
renamed into place only once complete, so killing the process at any moment leaves the previous
checkpoint loadable. Weights are stored as safetensors; training state with `torch.save` of plain
data and read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from nmt.config import Config, load_config, save_config

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A model or checkpoint directory is missing, incomplete or unreadable."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(model: nn.Module, path: Path) -> None:
    """Saves a model's weights as safetensors (tied tensors stored once), atomically."""
    with atomic_path(path) as tmp:
        save_model(_unwrap(model), str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    """Loads safetensors weights into `model`; a shape or name mismatch names the tensor."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    inner = _unwrap(model)
    try:
        prepare = getattr(inner, "prepare_output_vocab", None)
        if prepare is not None:  # the output vocabulary's size is the file's, not the config's
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                stored = f.get_slice("output_ids").get_shape() if "output_ids" in names else None
            prepare(stored[0] if stored else None)
        missing, unexpected = load_model(inner, str(path), strict=False)
    except Exception as err:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"cannot load weights from {path}: {err}") from err
    if unexpected or missing:
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def write_model_dir(
    model_dir: Path,
    model: nn.Module,
    cfg: Config,
    tokenizer_files: list[Path],
    meta: dict[str, Any],
    card: str | None = None,
) -> None:
    """Writes (or refreshes) a self-contained model directory, file by file, atomically."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for src in tokenizer_files:
        target = model_dir / src.name
        if not target.exists() or target.read_bytes() != src.read_bytes():
            with atomic_path(target) as tmp:
                shutil.copyfile(src, tmp)
    with atomic_path(model_dir / CONFIG_FILE) as tmp:
        save_config(cfg, tmp)
    save_weights(model, model_dir / MODEL_FILE)
    write_json_atomic(model_dir / META_FILE, meta)
    if card is not None:
        write_text_atomic(model_dir / "README.md", card)


def read_model_dir(model_dir: Path) -> tuple[Config, dict[str, Any]]:
    """Reads a model directory's config and metadata, with errors that say what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (model_dir / name).is_file():
            raise CheckpointError(
                f"{model_dir} is not a model directory: {name} is missing "
                f"(a training run keeps its best model in <run>/model)"
            )
    cfg = load_config(model_dir / CONFIG_FILE)
    meta_path = model_dir / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return cfg, meta


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = _STEP_DIR.match(p.name)
        if match and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: int,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Writes checkpoints/step-N atomically (a temp dir renamed into place) and prunes old ones.

    `state` must be plain data (tensors, numbers, strings, lists, dicts). If writing fails (disk
    full), the partial temp dir is removed and the previous checkpoints are untouched.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        save_model(_unwrap(model), str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        for name in (MODEL_FILE, STATE_FILE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint_state(ckpt_dir: Path) -> dict[str, Any]:
    """Training state of a checkpoint, read without unpickling code."""
    try:
        state: dict[str, Any] = torch.load(ckpt_dir / STATE_FILE, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training state {ckpt_dir / STATE_FILE}: {err}") from err
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the weights of several checkpoints (or model directories)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        file = path / MODEL_FILE if path.is_dir() else path
        weights = load_file(str(file))
        if total and set(weights) != set(total):
            raise CheckpointError(f"{file} has different tensors from {paths[0]}")
        for name, tensor in weights.items():
            t = tensor.to(torch.float64) if tensor.is_floating_point() else tensor
            if name in total:
                if total[name].is_floating_point():
                    total[name] += t
                elif not torch.equal(total[name], t):  # e.g. the output vocabulary
                    raise CheckpointError(f"{file}: {name} differs from {paths[0]}'s")
            else:
                total[name] = t.clone()
    return {
        name: (t / len(paths)).to(torch.float32) if t.is_floating_point() else t
        for name, t in total.items()
    }


def save_averaged(weights: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp))
