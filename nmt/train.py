"""The training loop: teacher forcing, validation with BLEU, checkpoints, resume, early stopping,
a time budget with a schedule planned against it, and the choice of the model to ship.

`train()` builds the pieces (data, model, optimiser, sampler) and hands them to a `Trainer`, whose
`run()` is the loop: batch -> `step()` -> log -> `validate()` on time or on steps -> `save()`; then
`finish()` ships the best of the candidate weights on dev BLEU. SIGTERM and SIGINT stop the loop
at the next step boundary with a checkpoint (`TrainingInterrupted`), and `train.save_every_minutes`
bounds what a kill -9 loses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nmt import checkpoint as ckpt
from nmt.config import Config, TrainConfig, save_config
from nmt.corpus import read_lines
from nmt.data import (
    DEFAULT_MAX_BUCKETS,
    DEFAULT_PAD_TO_MULTIPLE,
    Batch,
    Buckets,
    EncodedCorpus,
    TokenBatchSampler,
    file_digest,
)
from nmt.ema import WeightEMA
from nmt.loss import fused_linear_smoothed_nll, label_smoothed_nll
from nmt.model import Seq2Seq, build_model, count_parameters
from nmt.model.cells import use_kernels
from nmt.schedule import BUDGET_SCHEDULES, learning_rate, warmup_done
from nmt.tokenizer import Tokenizer
from nmt.train_report import model_card, plot_curves
from nmt.train_state import (
    DistInfo,
    LoopState,
    MetricsLog,
    ResumePoint,
    StopRequested,
    StopSignals,
    TrainingError,
    TrainingInterrupted,
    all_reduce_max,
    all_reduce_sum,
    check_fingerprints,
    choose_precision,
    hardware_description,
    init_distributed,
    peak_memory_mb,
    prepare_run,
    release_free_heap,
    resident_memory_mb,
    rng_state,
    set_rng_state,
)
from nmt.translate import autocast, resolve_device
from nmt.validate import (
    record_confidence_calibration,
    record_test_scores,
    resolve_split,
    validate,
)

__all__ = ["TrainResult", "Trainer", "TrainingError", "TrainingInterrupted", "learning_rate",
           "train"]  # fmt: skip

logger = logging.getLogger(__name__)

VALID_SHARE = 0.05  # timed validation: at most this share of the training clock
WeightsInModel = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    best_bleu: float
    stopped_because: str
    history: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD over the trainable parameters. Adam runs PyTorch's fused implementation
    (one kernel over all parameters) where they are CPU or CUDA float tensors: on the CPU it
    takes a third of the time of the per-tensor loop, 3% of the Bible config's training step.
    It does not bump the weights' version counters; `_optimizer_step` does."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# -- data ----------------------------------------------------------------------------------------


TOKENIZER_STAMP = "trained_with.json"  # in run/tokenizer: the settings and data it was trained on


def prepare_tokenizer(
    cfg: Config, run_dir: Path, train_files: tuple[Path, Path], resuming: bool
) -> Tokenizer:
    """Trains SentencePiece on the training split into `run/tokenizer`, with a note of what it was
    trained with (the tokenizer config and the training files' contents).

    A fresh start reuses the folder only when that note matches (a run killed before its first
    checkpoint and restarted with other settings trains it again); a resumed run always reuses
    it, and its checkpoint checks that it is the tokenizer it was trained with.
    """
    tok_dir = run_dir / "tokenizer"
    if resuming:
        try:
            return Tokenizer.load(tok_dir)
        except (OSError, ValueError) as err:
            raise TrainingError(f"cannot resume: {err}; the checkpoint needs the tokenizer it "
                                "was trained with") from None  # fmt: skip
    wanted = {"tokenizer": asdict(cfg.tokenizer), "train_data": list(map(file_digest, train_files))}
    try:
        stamp = json.loads((tok_dir / TOKENIZER_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = None
    if stamp == wanted:
        try:
            return Tokenizer.load(tok_dir)
        except (OSError, ValueError):
            pass
    elif stamp is not None or tok_dir.exists():
        logger.warning("%s was trained with other tokenizer settings or data (or is unlabelled); "
                       "training it again", tok_dir)  # fmt: skip
    logger.info("training SentencePiece (%s, %d) on %s", cfg.tokenizer.model_type,
                cfg.tokenizer.vocab_size, train_files[0].parent)  # fmt: skip
    with ckpt.atomic_dir(tok_dir) as tmp:
        Tokenizer.train(train_files[0], train_files[1], tmp, cfg.tokenizer)
        (tmp / TOKENIZER_STAMP).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return Tokenizer.load(tok_dir)


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
    model: Seq2Seq, batch: Batch, prob: float, pad_id: int, generator: torch.Generator | None = None
) -> Tensor:
    """Teacher forcing where each input token is, with probability `prob`, the model's own guess
    (padding stays padding)."""
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
            prev = torch.where(use_guess & (gold != pad_id), guess, gold)
    return torch.stack(steps, dim=1)  # (B, T, V)


class TrainingForward(nn.Module):
    """The training forward pass and its loss as one module call.

    DistributedDataParallel averages the gradients of the forwards it runs itself, so the whole
    forward of a step, teacher forcing or scheduled sampling, is this module's `forward`, and
    under torchrun the DDP wrapper goes around this module. Without scheduled sampling the
    output projection and the loss run fused, block by block, and the (B, T, V) logits are
    never built.
    """

    def __init__(self, model: Seq2Seq, pad_id: int, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.pad_id, self.label_smoothing = model, pad_id, label_smoothing

    def forward(
        self, batch: Batch, ss_prob: float = 0.0, wait_k: int | Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Summed label-smoothed loss, summed NLL and the number of target tokens of one batch.
        wait_k: wait-k teacher forcing (target step t reads the first t + k source tokens; a
        (B,) tensor: a k per sentence)."""
        model, pad_id, smoothing = self.model, self.pad_id, self.label_smoothing
        if ss_prob > 0:
            logits = scheduled_sampling_logits(model, batch, ss_prob, pad_id)
            return label_smoothed_nll(logits, batch.tgt_out, pad_id, smoothing, model.column_of)
        features = model(batch.src, batch.src_lengths, batch.src_mask, batch.tgt_in,
                         features=True, wait_k=wait_k)  # fmt: skip
        weight, bias = model.output_weights()
        return fused_linear_smoothed_nll(features, weight, bias, batch.tgt_out, pad_id, smoothing,
                                         model.column_of)  # fmt: skip


def wait_k_of_step(wait_k: int | tuple[int, int] | None, seed: int, step: int) -> int | None:
    """The k of one training step's wait-k mask: `train.wait_k` itself, or for a range [lo, hi]
    a draw that depends on the seed and the step only, so a resumed run draws the same k and
    every rank of a distributed run agrees (Elbayad et al., 2020, "Efficient wait-k")."""
    if wait_k is None or isinstance(wait_k, int):
        return wait_k
    low, high = wait_k
    return random.Random(seed * 1_000_003 + step).randint(low, high)


def wait_k_of_rows(
    wait_k: tuple[int, int], seed: int, step: int, micro: int, rank: int, rows: int
) -> Tensor:
    """A k per sentence of one micro-batch (`train.wait_k_sampling: sentence`), (rows,) long,
    drawn uniformly from [lo, hi]; like `wait_k_of_step`, a function of the seed, the step, the
    micro-batch and the rank only, so that a resumed run draws the same."""
    low, high = wait_k
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank)
    return torch.randint(low, high + 1, (rows,), generator=gen)


# -- the run -------------------------------------------------------------------------------------


class Trainer:
    """Owns one training run: the model, optimiser, schedule, sampler, metrics log and
    `LoopState`. `run()` is the loop; `step()`, `validate()` and `save(reason)` are its parts."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        resume_from: ResumePoint | None = None,
        reset_optimizer: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        progress: bool = True,
    ) -> None:
        self.cfg, self.tc, self.run_dir, self.clock = cfg, cfg.train, run_dir, clock
        self.stop = StopSignals()  # installed by `train()` around run() and finish()
        self.device = resolve_device(self.tc.device)
        self.info = init_distributed(self.device)
        if self.tc.num_threads > 0:
            torch.set_num_threads(self.tc.num_threads)
        kernels = "compiled" if self.tc.compile_cells else self.tc.cell_kernels
        if kernels == "auto" and self.device.type != "cpu":
            kernels = "eager"  # the native kernels are CPU ones: nothing to build
        chosen = use_kernels(kernels)
        logger.info("%s gate math and the loss: %s kernels", self.cfg.model.cell, chosen)
        self.precision = choose_precision(self.tc.precision, self.device)
        self.show_progress = progress and self.info.is_main
        torch.manual_seed(self.tc.seed)
        random.seed(self.tc.seed)
        self._load_data(resuming=resume_from is not None)
        self._build_model()
        self.loop = LoopState()
        self.log = MetricsLog(run_dir, self.info.is_main)
        if resume_from is not None:
            self._restore(resume_from, reset_optimizer)
        self.log.truncate_after(self.loop.step)
        self._last_save = self.loop.elapsed  # the training clock at the last checkpoint
        self._saved: tuple[tuple[int, int], Path] | None = None  # (step, skipped) and its path
        if self.tc.valid_every_minutes > 0 and self.loop.next_valid_time <= 0:
            self.loop.next_valid_time = self.tc.valid_every_minutes * 60
        self.lr = 0.0
        self.window_nll = self.window_tokens = 0.0
        self.window_start = self._last_tick = clock()
        self.last_valid: dict[str, Any] = {}
        self.bar: Any = None

    # -- setup ----------------------------------------------------------------------------------

    def _load_data(self, resuming: bool) -> None:
        """Tokenizer, encoded train and dev splits; everything that can fail on bad data or
        config fails here, before any training."""
        cfg, run_dir, info = self.cfg, self.run_dir, self.info
        train_files = resolve_split(cfg, "train")
        dev_files = resolve_split(cfg, "dev")
        run_dir.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            with ckpt.atomic_path(run_dir / ckpt.CONFIG_FILE) as tmp:
                save_config(cfg, tmp)
            self.tokenizer = prepare_tokenizer(cfg, run_dir, train_files, resuming)
        if info.world_size > 1:
            dist.barrier()
            self.tokenizer = Tokenizer.load(run_dir / "tokenizer")
        d = cfg.data
        cache_dir = Path(d.cache_dir) if d.cache_dir else run_dir / "cache"
        self.train_data = EncodedCorpus.build(train_files[0], train_files[1], self.tokenizer,
                                              cache_dir / "train", d.max_tokens,
                                              d.max_length_ratio)  # fmt: skip
        self.dev_data = EncodedCorpus.build(dev_files[0], dev_files[1], self.tokenizer,
                                            cache_dir / "dev", 10_000, 1e9)  # fmt: skip
        self.dev_refs = list(read_lines(dev_files[1]))  # split as the dev data is
        if len(self.dev_data) != len(self.dev_refs):
            raise TrainingError(f"dev set {dev_files[1]}: {len(self.dev_refs)} lines but "
                                f"{len(self.dev_data)} pairs after encoding; remove empty lines "
                                "from the dev files")  # fmt: skip
        self.length_ratio = self.train_data.length_ratio()
        # what a checkpoint must be resumed with, beside its config (`check_fingerprints`)
        self.fingerprints = {"tokenizer": self.tokenizer.fingerprint(),
                             "train_data": _content_digest(self.train_data),
                             "dev_data": _content_digest(self.dev_data)}  # fmt: skip
        self.fingerprint_files = {"tokenizer": ", ".join(map(str, self.tokenizer.files)),
                                  "train_data": f"{train_files[0]}, {train_files[1]}",
                                  "dev_data": f"{dev_files[0]}, {dev_files[1]}"}  # fmt: skip

    def _build_model(self) -> None:
        cfg, tc, tok = self.cfg, self.tc, self.tokenizer
        model = build_model(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id)
        self.model = model.to(self.device)
        if cfg.model.output_vocab == "target":
            self.model.set_output_vocab(output_vocab(self.train_data, tok), tok.unk_id)
        self.params = count_parameters(self.model)
        self.optimizer = make_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.precision == "fp16"))
        self.ema = WeightEMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        buckets = self.cfg.data.max_buckets
        self.sampler = TokenBatchSampler(self.train_data.src_lengths, self.train_data.tgt_lengths,
                                         tc.batch_tokens, seed=tc.seed, rank=self.info.rank,
                                         world_size=self.info.world_size,
                                         pad_to_multiple=None if buckets else DEFAULT_PAD_TO_MULTIPLE,
                                         max_buckets=buckets or DEFAULT_MAX_BUCKETS)  # fmt: skip
        # every training forward runs through train_model: under torchrun, DDP's wrapper
        self.train_model: nn.Module = TrainingForward(self.model, tok.pad_id, tc.label_smoothing)
        if self.info.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model)
        if self.info.is_main:
            logger.info("model: %s parameters; precision %s on %s; %d training pairs, padding "
                        "%.1f%%", f"{self.params['total']:,}", self.precision, self.device,
                        len(self.train_data), 100 * self.sampler.padding_ratio())  # fmt: skip

    def _restore(self, point: ResumePoint, reset_optimizer: bool) -> None:
        checkpoint, state = point
        check_fingerprints(state.get("fingerprints"), self.fingerprints, checkpoint,
                           self.fingerprint_files)  # fmt: skip
        ckpt.load_weights(self.model, checkpoint / ckpt.MODEL_FILE)
        if not reset_optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        self.loop = LoopState(**state["loop"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
            self.ema.decay = self.tc.ema_decay
        set_rng_state(state["rng"])
        logger.info("resumed from %s (step %d, epoch %d, %.1f min on the training clock)",
                    checkpoint, self.loop.step, self.loop.epoch, self.loop.elapsed / 60)  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> str:
        """Batch -> step -> log -> validate -> checkpoint, until a limit. Returns why it stopped."""
        tc, loop = self.tc, self.loop
        if self._out_of_steps() or self._out_of_time():
            return "already_complete"
        self.model.train()
        self.bar = self._progress_bar()
        self._last_tick = self.window_start = self.clock()
        try:
            while True:
                if tc.max_epochs and loop.epoch >= tc.max_epochs:
                    return "max_epochs"
                for micro in self._epoch_batches():
                    stepped = self.step(micro)
                    if stepped and loop.step % tc.log_every == 0:
                        self._log_window()
                    self._check_stop()
                    if not stepped:
                        continue
                    out_of_time, out_of_steps = self._out_of_time(), self._out_of_steps()
                    if self._validation_due() or out_of_time or out_of_steps:
                        if self.validate():
                            return "early_stopping"
                        self._check_stop()
                    if out_of_steps:
                        return "max_steps"
                    if out_of_time:
                        return "max_minutes"
                    if self._save_due():
                        self.save("timed", timed=True)
                loop.epoch += 1
                loop.sampler = {}
        except StopRequested:
            raise self._interrupted() from None
        except KeyboardInterrupt:  # where no handler could be installed (not the main thread)
            self.save("interrupted", timed=True)
            raise
        except TrainingError:
            raise
        except Exception:
            logger.exception("training crashed at step %d; saving a checkpoint", loop.step)
            try:
                self.save("crash", timed=True)
            except Exception:
                logger.exception("could not save a checkpoint after the crash")
            raise
        finally:
            self.bar.close()

    def _epoch_batches(self) -> Iterator[list[list[int]]]:
        """The micro-batches of each step of the current epoch, from where a resume left off."""
        loop, sampler = self.loop, self.sampler
        sampler.set_epoch(loop.epoch)
        if loop.sampler and loop.sampler.get("epoch") == loop.epoch:
            sampler.load_state_dict(loop.sampler)
        batches = iter(sampler)
        while True:
            micro = []
            for _ in range(self.tc.accum_steps):
                idx = next(batches, None)
                if idx is None:
                    break
                micro.append(idx)
            if not micro:
                return
            yield micro

    def step(self, micro: list[list[int]]) -> bool:
        """One optimiser step over the micro-batches; False when a non-finite batch was skipped."""
        tc, loop, info = self.tc, self.loop, self.info
        ss_prob = tc.scheduled_sampling * min(1.0, loop.step / max(tc.scheduled_sampling_steps, 1))
        self.lr = learning_rate(loop.step + 1, tc, loop.plateau_scale, loop.elapsed,
                                loop.warmup_seconds)  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        wait_ks: list[int | Tensor | None]
        if isinstance(tc.wait_k, tuple) and tc.wait_k_sampling == "sentence":
            wait_ks = [wait_k_of_rows(tc.wait_k, tc.seed, loop.step, i, info.rank, len(idx))
                       for i, idx in enumerate(micro)]  # fmt: skip
        else:
            wait_ks = [wait_k_of_step(tc.wait_k, tc.seed, loop.step)] * len(micro)
        loss_sum, nll_sum, n_tokens = _accumulate(self.train_model, micro, self.train_data,
                                                  self.tokenizer, self.device, self.precision,
                                                  self.scaler, info, ss_prob,
                                                  self.sampler.buckets, wait_ks)  # fmt: skip
        total_tokens = all_reduce_sum(float(n_tokens), info)
        finite = all_reduce_sum(float(math.isfinite(loss_sum)), info) == info.world_size
        loop.sampler = self.sampler.state_dict()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if tc.nan_policy == "stop":
                raise TrainingError(
                    f"non-finite loss ({loss_sum}) at step {loop.step + 1}; lower train.lr, "
                    "check the data, or set train.nan_policy=skip to skip such batches"
                )
            loop.skipped_batches += 1
            logger.warning("step %d: non-finite loss, batch skipped", loop.step + 1)
            return False
        _optimizer_step(self.model, self.optimizer, self.scaler, tc,
                        info.world_size / max(total_tokens, 1))  # fmt: skip
        if self.ema is not None:
            self.ema.update(self.model)
        loop.step += 1
        loop.selected = False  # new weights: the shipped model is chosen again at the end
        loop.tokens_seen += int(total_tokens)
        self.window_nll += all_reduce_sum(nll_sum, info)
        self.window_tokens += total_tokens
        self._tick()
        if loop.warmup_seconds is None and warmup_done(loop.step, loop.elapsed, tc):
            loop.warmup_seconds = loop.elapsed
            self._log_plan()
        return True

    def _tick(self) -> None:
        """Advances the training clock (the ranks agree on it) and the progress bar."""
        now = self.clock()
        self.loop.elapsed = all_reduce_max(self.loop.elapsed + now - self._last_tick, self.info)
        self._last_tick = now
        if self.bar is not None:
            if self.tc.max_minutes > 0:  # the bar is over the budget's minutes
                shown = min(self.loop.elapsed / 60, self.tc.max_minutes)
                self.bar.update(max(shown - self.bar.n, 0.0))
            else:
                self.bar.update(self.loop.step - self.bar.n)

    def _out_of_time(self) -> bool:
        return self.tc.max_minutes > 0 and self.loop.elapsed >= self.tc.max_minutes * 60

    def _out_of_steps(self) -> bool:
        return self.tc.max_steps > 0 and self.loop.step >= self.tc.max_steps

    def _validation_due(self) -> bool:
        if self.tc.valid_every_minutes > 0:
            return self.loop.elapsed >= self.loop.next_valid_time
        return self.loop.step % self.tc.valid_every == 0

    def _save_due(self) -> bool:
        every = self.tc.save_every_minutes * 60
        return every > 0 and self.loop.elapsed - self._last_save >= every

    def _check_stop(self) -> None:
        """Raises StopRequested once a stop signal has reached any rank (they stop together)."""
        signum = self.stop.signum or 0
        if self.info.world_size > 1:
            signum = int(all_reduce_max(float(signum), self.info))
        if signum:
            self.stop.signum = self.stop.signum or signum
            raise StopRequested

    def _interrupted(self) -> TrainingInterrupted:
        """After a stop signal: a checkpoint of the step reached (unless the latest one is of
        it already), and the exception that says where it is."""
        loop = self.loop
        if self._saved is not None and self._saved[0] == (loop.step, loop.skipped_batches):
            path: Path | None = self._saved[1]
        else:
            path = self.save("stop signal", timed=True)
        stop = TrainingInterrupted(self.stop.signum or signal.SIGTERM, loop.step, path)
        if self.info.is_main:
            logger.warning("%s", stop)
        return stop

    # -- observing ------------------------------------------------------------------------------

    def _progress_bar(self) -> Any:
        """A bar over the time budget (elapsed and remaining minutes) when there is one, else
        over the steps."""
        from tqdm.auto import tqdm

        if self.tc.max_minutes > 0:
            return tqdm(total=self.tc.max_minutes, initial=round(self.loop.elapsed / 60, 3),
                        disable=not self.show_progress, unit="min", dynamic_ncols=True,
                        desc="train", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                        "{n:.1f}/{total:g} min [{elapsed}<{remaining}{postfix}]")  # fmt: skip
        return tqdm(total=self.tc.max_steps or None, initial=self.loop.step, unit="step",
                    disable=not self.show_progress, dynamic_ncols=True, desc="train")  # fmt: skip

    def _postfix(self, **values: str) -> None:
        if self.bar is not None:
            bleu = self.last_valid.get("dev_bleu")
            shown = {"step": str(self.loop.step), **values}
            if bleu is not None:
                shown["dev_bleu"] = f"{bleu:.2f}"
            self.bar.set_postfix(shown, refresh=False)

    def _log_window(self) -> None:
        """A `train` record of the steps since the last one: loss, perplexity, tokens/s, lr."""
        now = self.clock()
        seconds = max(now - self.window_start, 1e-9)
        nll = self.window_nll / max(self.window_tokens, 1)
        record = {"kind": "train", "step": self.loop.step, "epoch": self.loop.epoch,
                  "time": round(self.loop.elapsed, 1), "loss": nll, "ppl": math.exp(min(nll, 50)),
                  "tokens_per_s": self.window_tokens / seconds, "lr": self.lr}  # fmt: skip
        release_free_heap()  # else freed activations pile up as resident memory
        if self.device.type == "cpu":
            record["rss_mb"] = resident_memory_mb()
        self.log.write(record)
        self._postfix(loss=f"{nll:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{self.lr:.1e}")
        self.window_nll = self.window_tokens = 0.0
        self.window_start = now

    def _log_plan(self) -> None:
        """After warm-up, the budget's plan: how many steps fit before the deadline."""
        tc, loop = self.tc, self.loop
        if not (self.info.is_main and tc.max_minutes > 0 and tc.schedule in BUDGET_SCHEDULES):
            return
        rate = loop.step / max(loop.elapsed, 1e-9)
        left = tc.max_minutes * 60 - loop.elapsed
        logger.info("budget: warm-up took %.0f s at %.2f steps/s; about %d more steps fit in the "
                    "%.0f minutes left, with the learning rate reaching %.1e at the deadline",
                    loop.elapsed, rate, rate * left * (1 - VALID_SHARE), left / 60,
                    tc.min_lr)  # fmt: skip

    # -- validation, checkpoints, the shipped model ---------------------------------------------

    def _validate_weights(self) -> dict[str, Any]:
        return validate(self.model, self.dev_data, self.dev_refs, self.tokenizer, self.cfg,
                        self.device, self.precision, self.length_ratio)  # fmt: skip

    def validate(self) -> bool:
        """Validates, keeps the best model, updates plateau/early stopping, plans the next
        timed validation and saves a checkpoint. True means stop early."""
        tc, loop = self.tc, self.loop
        start = self.clock()
        with self.stop.interruptible(self.info.world_size == 1):  # ranks validate in lockstep
            record = self._validate_weights()
        self._tick()
        self.last_valid = {**record, "step": loop.step}
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
        cost = self.clock() - start
        if tc.valid_every_minutes > 0:  # keep validation under VALID_SHARE of the clock
            interval = max(tc.valid_every_minutes * 60, cost / VALID_SHARE)
            loop.next_valid_time = loop.elapsed + interval
        self.log.write({"kind": "valid", "step": loop.step, "epoch": loop.epoch,
                        "time": round(loop.elapsed, 1), **record, "best_bleu": loop.best_bleu,
                        "valid_seconds": round(cost, 2),
                        "peak_rss_mb": peak_memory_mb(self.device)})  # fmt: skip
        if self.info.is_main:
            logger.info("step %d: dev BLEU %.2f (best %.2f at %d), dev ppl %.2f", loop.step, bleu,
                        loop.best_bleu, loop.best_step, record["dev_ppl"])  # fmt: skip
            if improved:
                self._write_model(record, "best_validated")
        self._postfix()
        self.save("validation")
        self._tick()
        # the logging window's tokens/s counts training time only, not this validation's
        self.window_start += self._last_tick - start
        return tc.early_stopping > 0 and loop.bad_validations >= tc.early_stopping

    def save(self, reason: str, timed: bool = False) -> Path | None:
        """A checkpoint of everything a resumed run needs (rank 0 only); returns its path.

        `timed` checkpoints (on the clock, a signal, a crash) are deleted once the next one is
        written (see `ckpt.save_checkpoint`). A signal never cuts a save short.
        """
        self._last_save = self.loop.elapsed
        if not self.info.is_main:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": asdict(self.loop),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "fingerprints": self.fingerprints,
        }
        with self.stop.saving():
            path = ckpt.save_checkpoint(self.run_dir, self.loop.step, self.model, state,
                                        self.tc.keep_checkpoints, timed=timed)  # fmt: skip
        self._saved = ((self.loop.step, self.loop.skipped_batches), path)
        logger.info("checkpoint at step %d (%s): %s", self.loop.step, reason, path)
        return path

    def _meta(self, record: dict[str, Any], weights: str) -> dict[str, Any]:
        d, loop = self.cfg.data, self.loop
        scores = {"dev_bleu": record["dev_bleu"], "dev_chrf": record["dev_chrf"],
                  "bleu_signature": record["bleu_signature"], "step": loop.step}  # fmt: skip
        if "dev_wait_k" in record:  # a wait-k model: dev BLEU is wait-k decoding's
            scores["dev_wait_k"] = record["dev_wait_k"]
        return {
            "src_lang": d.src_lang, "tgt_lang": d.tgt_lang, "length_ratio": list(self.length_ratio),
            "parameters": self.params, "scores": scores, "step": loop.step, "epoch": loop.epoch,
            "train_minutes": round(loop.elapsed / 60, 2), "precision": self.precision,
            "output_vocab": None if self.model.output_ids is None else self.model.num_outputs,
            "hardware": hardware_description(self.device), "train_pairs": len(self.train_data),
            "data": str(d.corpus or f"{d.train_src} / {d.train_tgt}"), "weights": weights,
        }  # fmt: skip

    def _write_model(
        self, record: dict[str, Any], weights: str, selection: dict[str, Any] | None = None
    ) -> None:
        meta = self._meta(record, weights)
        if selection is not None:
            meta["selection"] = selection
        with self.stop.saving():
            ckpt.write_model_dir(self.run_dir / "model", self.model, self.cfg,
                                 self.tokenizer.files, meta, model_card(self.cfg, meta))  # fmt: skip

    def finish(self, stopped: str) -> None:
        """The last checkpoint, the shipped model (the best candidate on dev BLEU), the curves
        and the test split's scores for the model card.

        A stop signal after the last checkpoint ends this at once; the resumed run, already
        complete, chooses the shipped model again."""
        try:
            if self.info.is_main:
                latest = ckpt.latest_checkpoint(self.run_dir)
                if latest is None or latest.name != f"step-{self.loop.step:08d}":
                    self.save(stopped)
                with self.stop.interruptible():
                    selected_now = False
                    if not self.loop.selected:
                        self.select_model()
                        selected_now = True
                    plot_curves(self.log.read(), self.run_dir / "curves.png")
                    if stopped != "already_complete" or selected_now:
                        record_confidence_calibration(self.cfg, self.run_dir / "model",
                                                      self.device, self.precision)  # fmt: skip
                    if self.tc.test_at_end and (stopped != "already_complete" or selected_now):
                        record_test_scores(self.cfg, self.run_dir / "model", self.device,
                                           self.precision)  # fmt: skip
        except StopRequested:
            raise self._interrupted() from None
        finally:
            self.log.close()

    def select_model(self) -> None:
        """Ships the best on dev BLEU of: the best validated weights, the last weights, the
        average of the last checkpoints and the moving average of the weights."""
        loop, tc = self.loop, self.tc
        if self.last_valid.get("step") != loop.step or not (self.run_dir / "model").is_dir():
            self.last_valid = {**self._validate_weights(), "step": loop.step}
        # name -> (dev record, a context manager that puts those weights into the model)
        candidates: dict[str, tuple[dict[str, Any], WeightsInModel]] = {
            "last": (self.last_valid, contextlib.nullcontext)
        }
        kept = ckpt.checkpoint_dirs(self.run_dir)
        recent = kept[-tc.average_last :] if tc.average_last else []
        if len(recent) >= 2:
            averaged = ckpt.average_checkpoints(recent)

            def average() -> contextlib.AbstractContextManager[Any]:
                return _weights_swapped(self.model, averaged)

            with average():
                name = f"average of the last {len(recent)} checkpoints"
                candidates[name] = (self._validate_weights(), average)
        if self.ema is not None:
            ema = self.ema

            def moving_average() -> contextlib.AbstractContextManager[Any]:
                return ema.swapped_into(self.model)

            with moving_average():
                candidates["ema"] = (self._validate_weights(), moving_average)
        scores = {name: round(rec["dev_bleu"], 2) for name, (rec, _) in candidates.items()}
        if loop.best_step != loop.step and loop.best_bleu >= 0:
            scores[f"best validated (step {loop.best_step})"] = round(loop.best_bleu, 2)
        chosen = max(scores, key=lambda n: scores[n])
        selection = {"chosen": chosen, "dev_bleu": scores}
        for name, bleu in scores.items():
            self.log.write({"kind": "select", "step": loop.step, "candidate": name,
                            "dev_bleu": bleu, "chosen": name == chosen})  # fmt: skip
        logger.info("shipped model: %s (dev BLEU %s)", chosen,
                    ", ".join(f"{n} {b:.2f}" for n, b in scores.items()))  # fmt: skip
        if chosen in candidates:
            record, swap = candidates[chosen]
            with swap():
                self._write_model(record, chosen, selection)
        else:  # the model directory already holds the best validated weights
            model_dir = self.run_dir / "model"
            meta = json.loads((model_dir / ckpt.META_FILE).read_text(encoding="utf-8"))
            meta["selection"] = selection
            with self.stop.saving():
                ckpt.update_model_meta(model_dir, meta, model_card(self.cfg, meta))
        loop.selected = True
        self.save("model selected")

    def result(self, stopped: str) -> TrainResult:
        loop = self.loop
        return TrainResult(self.run_dir, loop.step, loop.epoch, loop.best_bleu, stopped,
                           self.log.read())  # fmt: skip


def _content_digest(corpus: EncodedCorpus) -> str:
    """The digests of the files a corpus was encoded from (its cache holds their content hashes)."""
    return f"{corpus.meta['src']} {corpus.meta['tgt']}"


@contextlib.contextmanager
def _weights_swapped(model: nn.Module, weights: dict[str, Tensor]) -> Iterator[nn.Module]:
    """The model with `weights` (safetensors names, tied tensors once) inside the block."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ckpt.MODEL_FILE
        ckpt.save_averaged(weights, path)
        ckpt.load_weights(model, path)
    try:
        yield model
    finally:
        model.load_state_dict(saved)


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    reset_optimizer: bool = False,
    progress: bool = True,
    clock: Callable[[], float] | None = None,
) -> TrainResult:
    """Trains a model; everything needed to translate lands in `run_dir/model`.

    `clock` (seconds, monotonic) drives the time budget; tests pass a simulated one.
    """
    run_dir = Path(run_dir)
    cfg, resume_from = prepare_run(cfg, run_dir, resume, reset_optimizer)
    trainer = Trainer(cfg, run_dir, resume_from, reset_optimizer,
                      clock or time.perf_counter, progress)  # fmt: skip
    try:
        with trainer.stop.installed():  # SIGTERM / SIGINT: a checkpoint, then TrainingInterrupted
            stopped = trainer.run()
            trainer.finish(stopped)
    finally:
        trainer.log.close()
    return trainer.result(stopped)


def _accumulate(
    train_model: nn.Module,
    micro: list[list[int]],
    data: EncodedCorpus,
    tokenizer: Tokenizer,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler,
    info: DistInfo,
    ss_prob: float,
    padding: Buckets,
    wait_ks: Sequence[int | Tensor | None] | None = None,
) -> tuple[float, float, int]:
    """Forward and backward over the micro-batches of one step; gradients are sums over tokens.
    `train_model` is the `TrainingForward`, or the DDP wrapper around it; `wait_ks`: each
    micro-batch's wait-k (a k, a k per row, or None)."""
    loss_total = nll_total = 0.0
    tokens = 0
    for i, idx in enumerate(micro):
        batch = data.batch(idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                           padding=padding).to(device)  # fmt: skip
        sync = i == len(micro) - 1 or info.world_size == 1
        ctx = train_model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            with autocast(device, precision):
                wait_k = None if wait_ks is None else wait_ks[i]
                loss, nll, n_tok = train_model(batch, ss_prob, wait_k)
            scaler.scale(loss).backward()
        loss_total += float(loss.detach())
        nll_total += float(nll.detach())
        tokens += int(n_tok)
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
    if optimizer.defaults.get("fused"):
        # PyTorch's fused Adam writes the weights without bumping their version counters, so
        # caches keyed on a weight's version (the restricted output matrix, `output_weights`)
        # would keep the old weights: bump them as any in-place update does
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.autograd.graph.increment_version(params)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
