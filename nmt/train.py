"""The training loop: teacher forcing, validation with BLEU, checkpoints, resume, early stopping, DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nmt import checkpoint as ckpt
from nmt.config import Config, ConfigError, TrainConfig, config_from_dict, load_config, save_config
from nmt.corpus import CorpusError, split_files
from nmt.data import Batch, EncodedCorpus, TokenBatchSampler
from nmt.loss import label_smoothed_nll
from nmt.metrics import corpus_scores
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.search import beam_search, greedy_search
from nmt.tokenizer import Tokenizer
from nmt.train_report import model_card, plot_curves
from nmt.translate import autocast, resolve_device

logger = logging.getLogger(__name__)

# Settings that may change on resume without a flag: they bound or observe the run, and do not
# change what a step computes.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.max_epochs", "train.max_minutes", "train.valid_every",
    "train.log_every", "train.keep_checkpoints", "train.early_stopping", "train.valid_max_sentences",
    "train.valid_beam_size", "train.nan_policy", "train.device", "train.num_threads", "decode",
}  # fmt: skip
# Settings that change the optimisation; changing them on resume needs --reset-optimizer.
OPTIMIZER_CHANGES = {
    "train.optimizer", "train.lr", "train.betas", "train.momentum", "train.weight_decay",
    "train.schedule", "train.warmup_steps", "train.decay_rate", "train.decay_steps",
    "train.plateau_factor", "train.plateau_patience", "train.min_lr", "train.clip_norm",
}  # fmt: skip


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    best_bleu: float
    stopped_because: str
    history: list[dict[str, Any]] = field(default_factory=list)


# -- learning rate -------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig, plateau_scale: float = 1.0) -> float:
    """The learning rate at `step` (1-based): a pure function of the step and the plateau scale."""
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        factor = step / warm
    elif cfg.schedule == "inverse_sqrt":
        factor = math.sqrt(max(warm, 1) / max(step, 1))
    elif cfg.schedule == "exponential":
        factor = cfg.decay_rate ** ((step - warm) / max(cfg.decay_steps, 1))
    else:  # constant, plateau
        factor = 1.0
    lr = cfg.lr * factor * plateau_scale
    return max(lr, cfg.min_lr) if step >= warm else lr


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


# -- data ----------------------------------------------------------------------------------------


def resolve_split(cfg: Config, split: str) -> tuple[Path, Path]:
    """Source and target files of a split, from explicit paths or the corpus folder."""
    d = cfg.data
    explicit = {"train": (d.train_src, d.train_tgt), "dev": (d.dev_src, d.dev_tgt)}.get(split)
    if explicit and explicit[0] and explicit[1]:
        for p in explicit:
            if not Path(p).is_file():  # type: ignore[arg-type]
                raise ConfigError(f"data.{split}_src/{split}_tgt: file not found: {p}")
        return Path(explicit[0]), Path(explicit[1])
    if d.corpus is None:
        raise ConfigError(f"data: no {split} files; set data.corpus or data.{split}_src/_tgt")
    return split_files(Path(d.corpus), split, d.src_lang, d.tgt_lang)


def prepare_tokenizer(cfg: Config, run_dir: Path, train_files: tuple[Path, Path]) -> Tokenizer:
    """Trains SentencePiece on the training split once; later runs and resumes reuse it."""
    tok_dir = run_dir / "tokenizer"
    try:
        return Tokenizer.load(tok_dir)
    except (FileNotFoundError, OSError, ValueError):
        logger.info("training SentencePiece (%s, %d) on %s", cfg.tokenizer.model_type,
                    cfg.tokenizer.vocab_size, train_files[0].parent)  # fmt: skip
        return Tokenizer.train(train_files[0], train_files[1], tok_dir, cfg.tokenizer)


def output_vocab(train_data: EncodedCorpus, tokenizer: Tokenizer) -> Tensor:
    """The tokens a model's softmax covers with `model.output_vocab: target`: those seen on the
    target side of the training data, plus UNK and EOS."""
    ids = train_data.target_token_ids().tolist()
    vocab = torch.tensor(sorted({*ids, tokenizer.unk_id, tokenizer.eos_id}), dtype=torch.long)
    logger.info("output vocabulary: %d of %d tokens (those seen on the target side)",
                vocab.numel(), tokenizer.tgt_vocab_size)  # fmt: skip
    return vocab


# -- the step ------------------------------------------------------------------------------------


def scheduled_sampling_logits(
    model: Seq2Seq, batch: Batch, prob: float, generator: torch.Generator | None = None
) -> Tensor:
    """Teacher forcing where each input token is, with probability `prob`, the model's own guess."""
    memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    steps = []
    prev = batch.tgt_in[:, 0]
    for t in range(batch.tgt_in.size(1)):
        logits, state, _ = model.step(prev, state, memory)
        steps.append(logits)
        if t + 1 < batch.tgt_in.size(1):
            gold = batch.tgt_in[:, t + 1]
            guess = model.token_ids(logits.detach().argmax(-1))
            use_guess = torch.rand(gold.shape, generator=generator, device=gold.device) < prob
            prev = torch.where(use_guess & (gold != 0), guess, gold)
    return torch.stack(steps, dim=1)  # (B, T, V)


def forward_loss(
    model: nn.Module, batch: Batch, cfg: TrainConfig, pad_id: int, ss_prob: float
) -> tuple[Tensor, Tensor, int]:
    """Summed label-smoothed loss, summed NLL and the number of target tokens of one batch."""
    inner = cast(Seq2Seq, getattr(model, "module", model))
    if ss_prob > 0:
        logits = scheduled_sampling_logits(inner, batch, ss_prob)
    else:
        logits = model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)
    loss, nll, n_tokens = label_smoothed_nll(
        logits, batch.tgt_out, pad_id, cfg.label_smoothing, inner.column_of
    )
    return loss, nll, int(n_tokens)


# -- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: Seq2Seq,
    dev: EncodedCorpus,
    dev_refs: list[str],
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    precision: str,
    length_ratio: tuple[float, float],
) -> dict[str, Any]:
    """Dev loss, perplexity and detokenised BLEU/chrF of greedy (or small-beam) output."""
    inner = model
    inner.eval()
    tc = cfg.train
    n = len(dev) if tc.valid_max_sentences <= 0 else min(len(dev), tc.valid_max_sentences)
    sampler = TokenBatchSampler(
        dev.src_lengths[:n], dev.tgt_lengths[:n], cfg.train.batch_tokens, seed=0, shuffle=False
    )
    loss_sum = nll_sum = 0.0
    tokens = 0
    hyps: dict[int, list[int]] = {}
    for idx in sampler:
        batch = dev.batch(idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).to(device)
        with autocast(device, precision):
            logits = inner(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in)
            loss, nll, n_tok = label_smoothed_nll(
                logits, batch.tgt_out, tokenizer.pad_id, 0.0, inner.column_of
            )
            if tc.valid_beam_size > 1:
                results = [
                    h[0]
                    for h in beam_search(
                        inner,
                        batch.src,
                        batch.src_lengths,
                        batch.src_mask,
                        bos_id=tokenizer.bos_id,
                        eos_id=tokenizer.eos_id,
                        beam_size=tc.valid_beam_size,
                        length_penalty=cfg.decode.length_penalty,
                        max_len_a=length_ratio[0],
                        max_len_b=int(length_ratio[1]),
                    )  # fmt: skip
                ]
            else:
                results = greedy_search(
                    inner, batch.src, batch.src_lengths, batch.src_mask,
                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                    max_len_a=length_ratio[0], max_len_b=int(length_ratio[1]),
                )  # fmt: skip
        loss_sum += float(loss)
        nll_sum += float(nll)
        tokens += int(n_tok)
        for i, h in zip(idx, results):
            hyps[int(i)] = h.tokens
    order = sorted(hyps)
    texts = tokenizer.decode_tgt([hyps[i] for i in order])
    refs = [dev_refs[i] for i in order]
    scores = corpus_scores(texts, [refs])
    inner.train()
    nll_avg = nll_sum / max(tokens, 1)
    return {
        "dev_loss": loss_sum / max(tokens, 1),
        "dev_nll": nll_avg,
        "dev_ppl": math.exp(min(nll_avg, 50.0)),
        "dev_bleu": scores.bleu,
        "dev_chrf": scores.chrf,
        "bleu_signature": scores.bleu_signature,
        "dev_sentences": len(order),
    }


# -- the run -------------------------------------------------------------------------------------


def record_test_scores(cfg: Config, model_dir: Path, device: torch.device, precision: str) -> None:
    """Scores the best model on the corpus's test split (if it has one) for the model card.

    Only reported, never used to choose anything: selection happens on the dev split.
    """
    try:
        src_path, ref_path = resolve_split(cfg, "test")
    except (ConfigError, CorpusError):
        return
    from nmt.translate import Translator, translate_corpus

    translator = Translator.load(model_dir, device=str(device),
                                 precision="bf16" if precision == "bf16" else "fp32")  # fmt: skip
    src = src_path.read_text(encoding="utf-8").splitlines()
    refs = ref_path.read_text(encoding="utf-8").splitlines()
    hyps = [""] * len(src)
    for i, result in translate_corpus(translator, src):
        hyps[i] = result.text
    scores = corpus_scores(hyps, [refs])
    meta = json.loads((model_dir / ckpt.META_FILE).read_text(encoding="utf-8"))
    meta["scores"].update({"test_bleu": scores.bleu, "test_chrf": scores.chrf,
                           "test_beam_size": cfg.decode.beam_size, "test_data": str(src_path)})  # fmt: skip
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, meta)
    ckpt.write_text_atomic(model_dir / "README.md", model_card(cfg, meta))
    logger.info("test split %s: BLEU %.2f (beam %d), chrF %.2f", src_path, scores.bleu,
                cfg.decode.beam_size, scores.chrf)  # fmt: skip


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


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    reset_optimizer: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains a model; everything needed to translate lands in `run_dir/model`."""
    run_dir = Path(run_dir)
    cfg, resume_from = prepare_run(cfg, run_dir, resume, reset_optimizer)
    tc = cfg.train
    device = resolve_device(tc.device)
    info = init_distributed(device)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    precision = choose_precision(tc.precision, device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # Everything that can fail on bad data or config fails here, before any training.
    train_files = resolve_split(cfg, "train")
    dev_files = resolve_split(cfg, "dev")
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        save_config(cfg, run_dir / ckpt.CONFIG_FILE)
        tokenizer = prepare_tokenizer(cfg, run_dir, train_files)
    if info.world_size > 1:
        dist.barrier()
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    d = cfg.data
    train_data = EncodedCorpus.build(train_files[0], train_files[1], tokenizer, cache_dir / "train",
                                     d.max_tokens, d.max_length_ratio)  # fmt: skip
    dev_data = EncodedCorpus.build(dev_files[0], dev_files[1], tokenizer, cache_dir / "dev",
                                   10_000, 1e9)  # fmt: skip
    dev_refs = dev_files[1].read_text(encoding="utf-8").splitlines()
    if len(dev_data) != len(dev_refs):
        raise TrainingError(f"dev set {dev_files[1]}: {len(dev_refs)} lines but {len(dev_data)} "
                            "pairs after encoding; remove empty lines from the dev files")  # fmt: skip
    length_ratio = train_data.length_ratio()

    model = build_model(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size,
                        tokenizer.pad_id).to(device)  # fmt: skip
    if cfg.model.output_vocab == "target":
        model.set_output_vocab(output_vocab(train_data, tokenizer), tokenizer.unk_id)
    params = count_parameters(model)
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    sampler = TokenBatchSampler(train_data.src_lengths, train_data.tgt_lengths, tc.batch_tokens,
                                seed=tc.seed, rank=info.rank, world_size=info.world_size)  # fmt: skip
    loop = LoopState()
    log = MetricsLog(run_dir, info.is_main)
    if resume_from is not None:
        ckpt.load_weights(model, resume_from / ckpt.MODEL_FILE)
        state = ckpt.load_checkpoint_state(resume_from)
        if not reset_optimizer:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        loop = LoopState(**state["loop"])
        set_rng_state(state["rng"])
        log.truncate_after(loop.step)
        logger.info("resumed from %s (step %d, epoch %d)", resume_from, loop.step, loop.epoch)
    if info.is_main:
        logger.info("model: %s parameters; precision %s on %s; %d training pairs, padding %.1f%%",
                    f"{params['total']:,}", precision, device, len(train_data),
                    100 * sampler.padding_ratio())  # fmt: skip
    train_model: nn.Module = model
    if info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model)

    def save(reason: str) -> None:
        if not info.is_main:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "loop": asdict(loop),
            "rng": rng_state(),
            "config": cfg.to_dict(),
        }
        ckpt.save_checkpoint(run_dir, loop.step, model, state, tc.keep_checkpoints)
        logger.info("checkpoint at step %d (%s)", loop.step, reason)

    def meta(scores: dict[str, Any]) -> dict[str, Any]:
        return {
            "src_lang": d.src_lang, "tgt_lang": d.tgt_lang, "length_ratio": list(length_ratio),
            "parameters": params, "scores": scores, "step": loop.step, "epoch": loop.epoch,
            "train_minutes": round(loop.elapsed / 60, 2), "precision": precision,
            "output_vocab": None if model.output_ids is None else model.num_outputs,
            "hardware": hardware_description(device), "train_pairs": len(train_data),
            "data": str(d.corpus or f"{d.train_src} / {d.train_tgt}"),
        }  # fmt: skip

    def run_validation() -> bool:
        """Validates, keeps the best model, updates plateau/early stopping; True means stop."""
        record = validate(model, dev_data, dev_refs, tokenizer, cfg, device, precision,
                          length_ratio)  # fmt: skip
        bleu = record["dev_bleu"]
        improved = bleu > loop.best_bleu
        if improved:
            loop.best_bleu, loop.best_step, loop.bad_validations = bleu, loop.step, 0
        else:
            loop.bad_validations += 1
        if tc.schedule == "plateau":
            if bleu > loop.plateau_best:
                loop.plateau_best, loop.plateau_bad = bleu, 0
            else:
                loop.plateau_bad += 1
                if loop.plateau_bad >= tc.plateau_patience:
                    loop.plateau_scale *= tc.plateau_factor
                    loop.plateau_bad = 0
        log.write({"kind": "valid", "step": loop.step, "epoch": loop.epoch,
                   "time": round(loop.elapsed, 1), **record, "best_bleu": loop.best_bleu,
                   "peak_rss_mb": peak_memory_mb(device)})  # fmt: skip
        if info.is_main:
            logger.info("step %d: dev BLEU %.2f (best %.2f at %d), dev ppl %.2f", loop.step, bleu,
                        loop.best_bleu, loop.best_step, record["dev_ppl"])  # fmt: skip
            if improved:
                scores = {"dev_bleu": bleu, "dev_chrf": record["dev_chrf"],
                          "bleu_signature": record["bleu_signature"], "step": loop.step}  # fmt: skip
                m = meta(scores)
                ckpt.write_model_dir(run_dir / "model", model, cfg, tokenizer.files, m,
                                     model_card(cfg, m))  # fmt: skip
        return tc.early_stopping > 0 and loop.bad_validations >= tc.early_stopping

    stopped = _loop(train_model, model, optimizer, scaler, sampler, train_data, tokenizer, cfg,
                    device, precision, info, loop, log, save, run_validation, progress)  # fmt: skip
    if info.is_main:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None or latest.name != f"step-{loop.step:08d}":
            save(stopped)
        if not (run_dir / "model" / ckpt.MODEL_FILE).is_file():
            run_validation()
        plot_curves(log.read(), run_dir / "curves.png")
        if tc.test_at_end and stopped != "already_complete":
            record_test_scores(cfg, run_dir / "model", device, precision)
    log.close()
    return TrainResult(run_dir, loop.step, loop.epoch, loop.best_bleu, stopped, log.read())


def _loop(
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    sampler: TokenBatchSampler,
    data: EncodedCorpus,
    tokenizer: Tokenizer,
    cfg: Config,
    device: torch.device,
    precision: str,
    info: DistInfo,
    loop: LoopState,
    log: MetricsLog,
    save: Callable[[str], None],
    run_validation: Callable[[], bool],
    progress: bool,
) -> str:
    """Batch -> step -> log -> validate -> checkpoint, until a limit is reached. Returns why it stopped."""
    from tqdm.auto import tqdm

    tc = cfg.train
    bar = tqdm(total=tc.max_steps or None, initial=loop.step, disable=not (progress and info.is_main),
               unit="step", dynamic_ncols=True, desc="train")  # fmt: skip
    window_loss = window_tokens = 0.0
    window_start = time.perf_counter()
    clock = time.perf_counter()
    model.train()
    if (tc.max_steps and loop.step >= tc.max_steps) or (
        tc.max_minutes and loop.elapsed >= tc.max_minutes * 60
    ):
        bar.close()
        return "already_complete"
    try:
        while True:
            if tc.max_epochs and loop.epoch >= tc.max_epochs:
                return "max_epochs"
            sampler.set_epoch(loop.epoch)
            if loop.sampler and loop.sampler.get("epoch") == loop.epoch:
                sampler.load_state_dict(loop.sampler)
            batches = iter(sampler)
            while True:
                micro = []
                for _ in range(tc.accum_steps):
                    idx = next(batches, None)
                    if idx is None:
                        break
                    micro.append(idx)
                if not micro:
                    break
                ss_prob = tc.scheduled_sampling * min(
                    1.0, loop.step / max(tc.scheduled_sampling_steps, 1)
                )
                lr = learning_rate(loop.step + 1, tc, loop.plateau_scale)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, nll_sum, n_tokens = _accumulate(train_model, micro, data, tokenizer, tc,
                                                          device, precision, scaler, info, ss_prob)  # fmt: skip
                total_tokens = all_reduce_sum(float(n_tokens), info)
                finite = all_reduce_sum(float(math.isfinite(loss_sum)), info) == info.world_size
                loop.sampler = sampler.state_dict()
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    if tc.nan_policy == "stop":
                        raise TrainingError(
                            f"non-finite loss ({loss_sum}) at step {loop.step + 1}; lower train.lr, "
                            "check the data, or set train.nan_policy=skip to skip such batches"
                        )
                    loop.skipped_batches += 1
                    logger.warning("step %d: non-finite loss, batch skipped", loop.step + 1)
                    continue
                _optimizer_step(
                    model, optimizer, scaler, tc, info.world_size / max(total_tokens, 1)
                )
                loop.step += 1
                loop.tokens_seen += int(total_tokens)
                window_loss += all_reduce_sum(nll_sum, info)
                window_tokens += total_tokens
                now = time.perf_counter()
                loop.elapsed += now - clock
                clock = now
                bar.update(1)
                if loop.step % tc.log_every == 0:
                    seconds = max(now - window_start, 1e-9)
                    record = {"kind": "train", "step": loop.step, "epoch": loop.epoch,
                              "time": round(loop.elapsed, 1),
                              "loss": window_loss / max(window_tokens, 1),
                              "ppl": math.exp(min(window_loss / max(window_tokens, 1), 50)),
                              "tokens_per_s": window_tokens / seconds, "lr": lr}  # fmt: skip
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    lr=f"{lr:.2e}", refresh=False)  # fmt: skip
                    window_loss = window_tokens = 0.0
                    window_start = time.perf_counter()
                out_of_time = tc.max_minutes > 0 and loop.elapsed >= tc.max_minutes * 60
                out_of_steps = tc.max_steps > 0 and loop.step >= tc.max_steps
                if loop.step % tc.valid_every == 0 or out_of_time or out_of_steps:
                    stop = run_validation()
                    save("validation")
                    now = time.perf_counter()
                    loop.elapsed += now - clock  # validation and saving count against max_minutes
                    clock = window_start = now
                    if stop:
                        return "early_stopping"
                if out_of_steps:
                    return "max_steps"
                if out_of_time:
                    return "max_minutes"
            loop.epoch += 1
            loop.sampler = {}
    except KeyboardInterrupt:
        save("interrupted")
        raise
    except TrainingError:
        raise
    except Exception:
        logger.exception("training crashed at step %d; saving a checkpoint", loop.step)
        try:
            save("crash")
        except Exception:
            logger.exception("could not save a checkpoint after the crash")
        raise
    finally:
        bar.close()


def _accumulate(
    train_model: nn.Module,
    micro: list[list[int]],
    data: EncodedCorpus,
    tokenizer: Tokenizer,
    tc: TrainConfig,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler,
    info: DistInfo,
    ss_prob: float,
) -> tuple[float, float, int]:
    """Forward and backward over the micro-batches of one step; gradients are sums over tokens."""
    loss_total = nll_total = 0.0
    tokens = 0
    for i, idx in enumerate(micro):
        batch = data.batch(idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).to(device)
        sync = i == len(micro) - 1 or info.world_size == 1
        ctx = train_model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            with autocast(device, precision):
                loss, nll, n_tok = forward_loss(train_model, batch, tc, tokenizer.pad_id, ss_prob)
            scaler.scale(loss).backward()
        loss_total += float(loss.detach())
        nll_total += float(nll.detach())
        tokens += n_tok
    return loss_total, nll_total, tokens


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    tc: TrainConfig,
    grad_scale: float,
) -> None:
    """Normalises summed gradients per target token, clips, and steps."""
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, grad_scale)
    if tc.clip_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
