"""What a training run keeps beside the loop: resume rules, RNG and loop state, the metrics log,
distributed helpers, and the facts about the hardware that go into the model card."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "train.num_threads", "decode",
}  # fmt: skip
# Settings that change the optimisation; changing them on resume needs --reset-optimizer.
OPTIMIZER_CHANGES = {
    "train.optimizer", "train.lr", "train.betas", "train.momentum", "train.weight_decay",
    "train.schedule", "train.warmup_steps", "train.decay_rate", "train.decay_steps",
    "train.plateau_factor", "train.plateau_patience", "train.min_lr", "train.clip_norm",
}  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, ...)."""


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
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drops records written after the checkpoint we resume from."""
        if self.enabled and self.path.is_file():
            kept = [r for r in self.read() if r["step"] <= step]
            ckpt.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


def prepare_run(
    cfg: Config, run_dir: Path, resume: bool, reset_optimizer: bool
) -> tuple[Config, Path | None]:
    """Checks the run directory and returns the config to use and the checkpoint to resume from."""
    latest = ckpt.latest_checkpoint(run_dir)
    saved_cfg_path = run_dir / ckpt.CONFIG_FILE
    if resume:
        if latest is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from scratch", run_dir)
        elif saved_cfg_path.is_file():
            cfg = reconcile_resume_config(load_config(saved_cfg_path), cfg, reset_optimizer)
    elif latest is not None:
        raise TrainingError(
            f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to continue "
            "it, or choose another --run-dir"
        )
    return cfg, latest if resume else None


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest of the ranks' values (one clock for every rank's schedule)."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
