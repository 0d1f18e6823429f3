"""What a training run keeps beside the loop: resume rules and fingerprints, stop signals, RNG and
loop state, the metrics log, distributed helpers, and the facts about the hardware that go into
the model card."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import platform
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist

from nmt import checkpoint as ckpt
from nmt.config import Config, ConfigError, config_from_dict, load_config

logger = logging.getLogger(__name__)

# Settings that may change on resume without a flag: they bound or observe the run, and do not
# change what a step computes.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.max_epochs", "train.max_minutes", "train.valid_every",
    "train.valid_every_minutes", "train.log_every", "train.keep_checkpoints",
    "train.early_stopping", "train.valid_max_sentences", "train.valid_beam_size",
    "train.average_last", "train.ema_decay", "train.nan_policy", "train.device",
    "train.num_threads", "train.save_every_minutes", "decode",
}  # fmt: skip
# Settings that change the optimisation; changing them on resume needs --reset-optimizer.
OPTIMIZER_CHANGES = {
    "train.optimizer", "train.lr", "train.betas", "train.momentum", "train.weight_decay",
    "train.schedule", "train.warmup_steps", "train.decay_rate", "train.decay_steps",
    "train.plateau_factor", "train.plateau_patience", "train.min_lr", "train.clip_norm",
}  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, ...)."""


class TrainingInterrupted(BaseException):  # like KeyboardInterrupt: not an error to catch broadly
    """Training stopped on SIGTERM or SIGINT, after saving a checkpoint of the step it reached."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {where}; "
                         "continue with --resume")  # fmt: skip

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class StopRequested(BaseException):
    """Raised inside the loop when a stop signal has arrived; `Trainer` turns it into a
    checkpoint and a `TrainingInterrupted`."""


class StopSignals:
    """SIGTERM (docker stop, Kubernetes, Slurm) and SIGINT (Ctrl-C) ask the loop to stop with a
    checkpoint, rather than kill it mid-step.

    The handler only takes note: the loop checks `signum` between steps, so the checkpoint is of
    a whole step. Inside an `interruptible()` block (validation, where the loop state is already
    at a step boundary) it raises StopRequested at once, so a long validation does not outlast
    the grace period. Inside `saving()` it never raises: a second signal cannot cut a save short.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saving = 0
        self._interruptible = False

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handles the signals inside the block (only the main thread can; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():  # None: one set outside Python
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            logger.warning("%s: already stopping (SIGKILL stops at once, losing the step)", name)
            return
        self.signum = signum
        if self._interruptible and not self._saving:
            logger.warning("%s: stopping now, with a checkpoint", name)
            raise StopRequested
        logger.warning("%s: stopping after this step, with a checkpoint", name)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """A block that a signal never interrupts; inside an interruptible block, a signal that
        came during the save stops the run once the save is complete."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if self._interruptible and not self._saving and self.signum is not None:
            raise StopRequested

    @contextmanager
    def interruptible(self, allowed: bool = True) -> Iterator[None]:
        """A block that a signal ends at once with StopRequested (where `allowed`)."""
        if self.signum is not None and allowed:
            raise StopRequested
        before, self._interruptible = self._interruptible, allowed
        try:
            yield
        finally:
            self._interruptible = before


# -- distributed ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# -- resume ------------------------------------------------------------------------------------


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def reconcile_resume_config(saved: Config, given: Config, reset_optimizer: bool) -> Config:
    """The config a resumed run uses: the saved one, plus only the changes that are allowed."""
    old, new = _flatten(saved.to_dict()), _flatten(given.to_dict())
    changed = sorted(k for k in old if old[k] != new.get(k))
    allowed = [k for k in changed if k in RESUMABLE_CHANGES or k.split(".")[0] in RESUMABLE_CHANGES]
    optim = [k for k in changed if k in OPTIMIZER_CHANGES]
    other = [k for k in changed if k not in allowed and k not in optim]
    if other:
        raise ConfigError(
            "cannot resume: these settings differ from the run's saved config and would change the "
            f"model or data: {', '.join(other)}; start a new run directory instead"
        )
    if optim and not reset_optimizer:
        raise ConfigError(
            f"cannot resume: optimiser settings differ from the run's saved config ({', '.join(optim)}); "
            "pass --reset-optimizer to apply them with a fresh optimiser state"
        )
    merged = saved.to_dict()
    for key in allowed + optim:
        node = merged
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = new[key]
    return config_from_dict(merged)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def choose_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AMX/AVX-512 bf16)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (or peak CUDA memory on a GPU), in MiB."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast("Callable[[int], int]", libc.malloc_trim)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_free_heap() -> None:
    """Hands the heap's free pages back to the OS (glibc's `malloc_trim(0)`; a no-op elsewhere).

    A training step frees tensors of many sizes, and glibc keeps the freed pages between live
    blocks: without this, resident memory of the Bible run grew from ~2 GB to over 4 GB in ten
    minutes, all of it free heap (one `malloc_trim` took it back to ~2 GB). Called once per log
    window, it costs a few milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_memory_mb() -> float | None:
    """This process's resident memory now, in MiB (None where /proc is not there)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"


class MetricsLog:
    """Metrics as JSON lines plus TensorBoard events (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                logger.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value,
                                           record["step"])  # fmt: skip
            self.writer.flush()

    def read(self) -> list[dict[str, Any]]:
        """The records. A torn last line (a kill or a full disk mid-write) is dropped with a
        warning; a corrupt line before it is a TrainingError naming the file and line."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip("\x00 \t")]
        records = []
        for i, (n, line) in enumerate(numbered):
            try:
                records.append(json.loads(line))
            except ValueError as err:
                if i + 1 < len(numbered):
                    raise TrainingError(f"{self.path}, line {n}: not a JSON record ({err}); "
                                        "repair or delete that line") from None  # fmt: skip
                logger.warning("%s, line %d: dropped a torn last record (%s)", self.path, n, err)
        return records

    def truncate_after(self, step: int) -> None:
        """Drops records written after `step`: on resume, those after the checkpoint we resume
        from; on a fresh start (step 0), those of an earlier attempt that never checkpointed."""
        if self.enabled and self.path.is_file():
            kept = [r for r in self.read() if r["step"] <= step] if step > 0 else []
            ckpt.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class LoopState:
    """Everything besides weights and optimiser that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    plateau_scale: float = 1.0
    plateau_best: float = -1.0
    plateau_bad: int = 0
    elapsed: float = 0.0
    skipped_batches: int = 0
    tokens_seen: int = 0
    warmup_seconds: float | None = None  # the training clock when warm-up ended
    next_valid_time: float = 0.0  # valid_every_minutes: the clock of the next validation
    selected: bool = False  # the shipped model has been chosen among the candidates


class ResumePoint(NamedTuple):
    checkpoint: Path
    state: dict[str, Any]  # its training state, read once


def prepare_run(
    cfg: Config, run_dir: Path, resume: bool, reset_optimizer: bool
) -> tuple[Config, ResumePoint | None]:
    """Checks the run directory and returns the config to use and the checkpoint to resume from.

    A kill mid-save is repaired first (`ckpt.recover_dir`). On resume the given config is
    reconciled with the config stored in the checkpoint itself: that is the one its weights and
    optimiser state belong to, whatever `config.yaml` says by now.
    """
    if int(os.environ.get("RANK", "0")) == 0:  # one process repairs (torchrun starts several)
        ckpt.recover_checkpoints(run_dir)
        ckpt.recover_dir(run_dir / "model")
    latest = ckpt.latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise TrainingError(
                f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                "continue it, or choose another --run-dir"
            )
        return cfg, None
    if latest is None:
        logger.warning("--resume: no checkpoint in %s yet; starting from scratch", run_dir)
        return cfg, None
    state = ckpt.load_checkpoint_state(latest)
    if "config" in state:
        cfg = reconcile_resume_config(config_from_dict(state["config"]), cfg, reset_optimizer)
    elif (run_dir / ckpt.CONFIG_FILE).is_file():  # a checkpoint without its config
        cfg = reconcile_resume_config(load_config(run_dir / ckpt.CONFIG_FILE), cfg, reset_optimizer)
    return cfg, ResumePoint(latest, state)


# What a checkpoint's fingerprints cover, for the message when one differs on resume.
FINGERPRINTS = {
    "tokenizer": "the SentencePiece model",
    "train_data": "the training data",
    "dev_data": "the dev data",
}


def check_fingerprints(
    saved: dict[str, str] | None, current: dict[str, str], checkpoint: Path, where: dict[str, str]
) -> None:
    """Refuses to resume when the tokenizer or the data differ from those the checkpoint was
    trained with (the config is compared by `reconcile_resume_config`).

    Args:
        saved: the fingerprints stored in the checkpoint (None: a checkpoint from before they were).
        current: the same fingerprints of this start.
        where: the files behind each fingerprint, named in the message.
    """
    if not saved:
        logger.warning("%s stores no fingerprints (older version): cannot check that the tokenizer "
                       "and the data are the ones it was trained with", checkpoint)  # fmt: skip
        return
    changed = [k for k in FINGERPRINTS if k in saved and saved[k] != current.get(k)]
    if changed:
        what = "; ".join(f"{FINGERPRINTS[k]} ({where.get(k, '?')})" for k in changed)
        raise TrainingError(
            f"cannot resume from {checkpoint}: these changed since it was saved: {what}. Resuming "
            "would mix two runs; restore them, or start a new run directory"
        )


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest of the ranks' values (one clock for every rank's schedule)."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
