"""Run directories, model directories and checkpoints: atomic saves, safe loads, averaging.

A run directory looks like this::

    run/
      config.yaml            the resolved config of the run
      tokenizer/             SentencePiece model(s), trained once on the training split, and
                             trained_with.json (the settings and data it was trained on)
      model/                 the best model so far (by dev BLEU): everything needed to translate
        config.yaml  spm*.model  model.safetensors  meta.json  README.md
      checkpoints/step-00001000/   model.safetensors, state.pt (optimizer, RNG, data position,
                             config, fingerprints of tokenizer and data, ...); an empty `timed`
                             file when saved on the clock or a signal, not at a validation
      metrics.jsonl  curves.png  tensorboard/

Every file is written to a temporary name and renamed into place, and a directory (a checkpoint,
the model directory) is written beside its final name and swapped in only once complete, with
files and directories fsynced, so killing the process at any moment (or a full disk) leaves the
previous version loadable. Weights are stored as safetensors; training state with `torch.save` of
plain data and read back with `weights_only=True`.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from nmt.config import Config, ConfigError, config_from_dict, save_config
from nmt.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A model or checkpoint directory is missing, incomplete or unreadable."""


class ModelFileError(CheckpointError, ValueError):
    """A file of a model or checkpoint directory is missing, truncated, corrupt or does not fit
    the model; the message names the file and what is wrong with it. Loading raises it, so the
    CLI and the service can report a broken model in one line."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`,
    and the directory is fsynced so that the rename survives a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(path: Path) -> None:
    """Makes the renames and deletions in a directory durable (where directories can be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, which cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse to sync a directory
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# A directory being replaced: `.NAME.<random>.tmp` is the new one being written (deleted when
# found later), `.NAME.old` the old one renamed away for the swap (put back when NAME is missing),
# `.NAME.trash` one being deleted.
_AWAY, _TRASH = ".old", ".trash"


@contextmanager
def atomic_dir(path: Path, before_swap: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; on success its files are fsynced and it
    replaces `path` in one swap, so a reader or a kill sees the old directory or the new one,
    never a mix. On failure the temporary directory is removed and `path` is untouched.

    The swap is one atomic exchange where the system has one (Linux); elsewhere the old directory
    is renamed away, the new one renamed in, and a kill between the two leaves the old one under
    `.NAME.old`, which `recover_dir` (called before every write) puts back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        fsync_dir(tmp)
        if before_swap is not None:
            before_swap()
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path) -> None:
    """Puts the complete directory `new` at `path`; the old version is deleted only afterwards."""
    if path.exists() and _exchange(new, path):
        fsync_dir(path.parent)
        _remove_dir(new)  # now the old version
        return
    away = path.with_name(f".{path.name}{_AWAY}")
    if path.exists():
        os.replace(path, away)
    os.replace(new, path)
    fsync_dir(path.parent)
    if away.exists():
        _remove_dir(away)


def recover_dir(path: Path) -> bool:
    """Repairs what a kill during `atomic_dir` can leave beside `path`: puts the old version back
    when the swap was cut between its two renames, and deletes unfinished or half-deleted copies.
    Returns True when the old version had to be put back."""
    parent, away = path.parent, path.with_name(f".{path.name}{_AWAY}")
    restored = False
    if away.is_dir():
        if path.exists():  # the swap finished; only the clean-up was cut short
            _remove_dir(away)
        else:
            os.replace(away, path)
            fsync_dir(parent)
            logger.warning("restored %s from %s (a save was cut short)", path, away.name)
            restored = True
    if parent.is_dir():
        for stale in parent.glob(f".{glob.escape(path.name)}.*"):
            if stale.is_dir() and (stale.name.endswith(".tmp") or stale.name.endswith(_TRASH)):
                shutil.rmtree(stale, ignore_errors=True)
    return restored


def _remove_dir(path: Path) -> None:
    """Deletes a directory as one rename (then the slow part): a kill never leaves half of it
    under its own name."""
    trash = path.with_name(f".{path.name.lstrip('.')}{_TRASH}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_libc: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or the filesystem cannot, and the caller falls back to two renames."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(model: nn.Module, path: Path) -> None:
    """Saves a model's weights as safetensors (tied tensors stored once), atomically."""
    with atomic_path(path) as tmp:
        save_model(_unwrap(model), str(tmp))


def read_weights_header(path: Path) -> dict[str, list[int]]:
    """The tensor names and shapes of a safetensors file, from its header only (cheap).

    safetensors checks that the header covers the whole file, so a truncated file fails here.

    Raises:
        ModelFileError: the file is missing, truncated or not a safetensors file.
    """
    if not path.is_file():
        raise ModelFileError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises SafetensorError, OSError, ...
        raise ModelFileError(f"{path} is truncated or not a safetensors file ({err})") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Loads safetensors weights into `model`.

    Raises:
        ModelFileError: the file is missing, truncated or corrupt (non-finite weights), or does
            not fit the model (the first differing tensor named).
    """
    shapes = read_weights_header(path)
    inner = _unwrap(model)
    try:
        prepare = getattr(inner, "prepare_output_vocab", None)
        if prepare is not None:  # the output vocabulary's size is the file's, not the config's
            stored = shapes.get("output_ids")
            prepare(stored[0] if stored else None)
        own = {name: list(t.shape) for name, t in inner.state_dict().items()}
        differ = [n for n, shape in shapes.items() if n in own and own[n] != shape]
        if differ:
            raise ModelFileError(
                f"{path} does not fit the model its config describes: {differ[0]} has shape "
                f"{shapes[differ[0]]} in the file but {own[differ[0]]} in the model"
                + (f" ({len(differ)} tensors differ)" if len(differ) > 1 else "")
            )
        missing, unexpected = load_model(inner, str(path), strict=False)
    except ModelFileError:
        raise
    except Exception as err:  # safetensors raises several types for corrupt files
        raise ModelFileError(f"cannot load weights from {path}: {err}") from err
    if unexpected or missing:
        raise ModelFileError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    broken = [n for n, p in inner.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise ModelFileError(
            f"{path} is corrupt: {broken[0]} holds NaN or infinite values"
            + (f" (and {len(broken) - 1} more tensors)" if len(broken) > 1 else "")
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
    """Writes (or replaces) a self-contained model directory as one atomic directory swap
    (`atomic_dir`): a kill leaves the old model or the new one, never new weights with old
    metadata."""
    with atomic_dir(Path(model_dir)) as tmp:
        for src in tokenizer_files:
            shutil.copyfile(src, tmp / src.name)
        save_config(cfg, tmp / CONFIG_FILE)
        save_model(_unwrap(model), str(tmp / MODEL_FILE))
        _write_meta(tmp, meta, card)


def update_model_meta(model_dir: Path, meta: dict[str, Any], card: str | None = None) -> None:
    """Replaces a model directory's meta.json (and model card), keeping its other files, as one
    atomic directory swap."""
    model_dir = Path(model_dir)
    with atomic_dir(model_dir) as tmp:
        for file in model_dir.iterdir():
            if file.is_file() and file.name not in (META_FILE, "README.md"):
                shutil.copyfile(file, tmp / file.name)
        _write_meta(tmp, meta, card)


def _write_meta(model_dir: Path, meta: dict[str, Any], card: str | None) -> None:
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
    if card is not None:
        (model_dir / "README.md").write_text(card, encoding="utf-8")


def read_model_dir(model_dir: Path) -> tuple[Config, dict[str, Any]]:
    """Reads a model directory's config and metadata, after checking every file it needs:
    config.yaml whole, meta.json (optional) a JSON object, the SentencePiece model(s) readable
    and model.safetensors complete (its header; `load_weights` reads the tensors).

    Raises:
        ModelFileError: the directory or one of its files is missing, truncated or corrupt; the
            message names the file and what is wrong.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists() and model_dir.with_name(f".{model_dir.name}{_AWAY}").is_dir():
        recover_dir(model_dir)  # a save was cut between the two renames of its swap
    if not model_dir.is_dir():
        raise ModelFileError(f"model directory not found: {model_dir}")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (model_dir / name).is_file():
            raise ModelFileError(
                f"{model_dir} is not a model directory: {name} is missing "
                f"(a training run keeps its best model in <run>/model)"
            )
    cfg = _read_saved_config(model_dir / CONFIG_FILE)
    meta = _read_meta(model_dir / META_FILE)
    try:
        Tokenizer.load(model_dir)
    except TokenizerError as err:
        raise ModelFileError(str(err)) from None
    read_weights_header(model_dir / MODEL_FILE)
    return cfg, meta


# `save_config` writes every section; these are the ones translating needs, "decode" the last
_SAVED_SECTIONS = ("tokenizer", "model", "decode")


def _read_saved_config(path: Path) -> Config:
    """A config written by `save_config`, checked to be whole (a cut file can still be YAML)."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFileError(f"cannot read {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ModelFileError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise ModelFileError(f"{path} is empty or not a config (expected a YAML mapping)")
    missing = [name for name in _SAVED_SECTIONS if name not in values]
    if missing:
        raise ModelFileError(
            f"{path} is incomplete (truncated?): no {', '.join(missing)} section(s)"
        )
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ModelFileError(f"{path}: {err}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json as a dict; {} when there is none."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8
        raise ModelFileError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return meta


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
    timed: bool = False,
) -> Path:
    """Writes checkpoints/step-N as one atomic directory swap (`atomic_dir`) and prunes old ones.

    `state` must be plain data (tensors, numbers, strings, lists, dicts). If writing fails (disk
    full), the partial temp dir is removed and the previous checkpoints are untouched; re-saving
    a step replaces its old copy only once the new one is complete.

    A `timed` checkpoint (saved on the clock or on a signal, to lose little work, not at a
    validation) is deleted when the next checkpoint is in place, so it never pushes a validated
    checkpoint out of the `keep` newest that averaging reads. Re-saving a validated step as
    `timed` keeps it validated.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    recover_checkpoints(run_dir)
    final = root / f"step-{step:08d}"
    timed = timed and (not final.is_dir() or is_timed(final))
    with atomic_dir(final, before_swap=before_rename) as tmp:
        save_model(_unwrap(model), str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        if timed:
            (tmp / _TIMED_FILE).touch()
    kept = checkpoint_dirs(run_dir)
    for old in kept[: kept.index(final)]:
        if is_timed(old):
            _remove_dir(old)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        _remove_dir(old)
    fsync_dir(root)
    return final


_TIMED_FILE = "timed"


def is_timed(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved on the clock or a signal rather than at a validation."""
    return (checkpoint / _TIMED_FILE).is_file()


def recover_checkpoints(run_dir: Path) -> None:
    """Repairs the checkpoints directory after a kill mid-save (`recover_dir` for each step)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    steps = {m.group(1) for p in root.iterdir() if (m := re.match(r"^\.step-(\d+)\.", p.name))}
    for step in sorted(steps):
        recover_dir(root / f"step-{step}")


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
    """Element-wise mean of the weights of several checkpoints (or model directories).

    Raises:
        ModelFileError: a weights file is missing, truncated or corrupt (non-finite values), or
            its tensors differ in names or shapes from the first's (the file named).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        file = path / MODEL_FILE if path.is_dir() else path
        read_weights_header(file)  # a missing or truncated file, named
        try:
            weights = load_file(str(file))
        except Exception as err:  # safetensors raises several types for corrupt files
            raise ModelFileError(f"cannot read {file}: {err}") from None
        if total and set(weights) != set(total):
            raise ModelFileError(f"{file} has different tensors from {paths[0]}")
        for name, tensor in weights.items():
            t = tensor.to(torch.float64) if tensor.is_floating_point() else tensor
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelFileError(f"{file} is corrupt: {name} holds NaN or infinite values")
            if name not in total:
                total[name] = t.clone()
            elif not total[name].is_floating_point():
                if not torch.equal(total[name], t):  # e.g. the output vocabulary
                    raise ModelFileError(f"{file}: {name} differs from {paths[0]}'s")
            elif total[name].shape != t.shape:
                raise ModelFileError(
                    f"{file}: {name} has shape {list(t.shape)} but {list(total[name].shape)} "
                    f"in {paths[0]}"
                )
            else:
                total[name] += t
    return {
        name: (t / len(paths)).to(torch.float32) if t.is_floating_point() else t
        for name, t in total.items()
    }


def save_averaged(weights: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp))
