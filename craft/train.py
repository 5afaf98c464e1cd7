"""craft-train: train the model of a YAML config on a corpus and write the run directory.

    craft-train                                         tiny preset on the bundled corpus
    craft-train --config small data.path=my.txt         a preset, one override
    craft-train --resume runs/small train.max_steps=4000  continue a run (exactly)
    craft-train --plot runs/small                       loss.png of the run (matplotlib)
    torchrun --standalone --nproc_per_node 2 -m craft.train ...   data-parallel (DDP) on 2 processes

Read top to bottom: lr_at (the schedule), prepare_run (tokenizer and tokens), evaluate, TrainStep
(one optimizer step), then train(), the loop: step, log, eval (best.pt, early stopping),
checkpoint, sample, stop on a signal. What a checkpoint holds and how a run resumes from it is
checkpoint.py; the run directory's files are run_dir.py; metrics and samples callbacks.py.

The step: AdamW (fused), linear warmup + cosine decay to train.lr_decay_steps, gradient clipping
and accumulation, optional bf16 autocast and torch.compile (eager, with a warning, where compiling
fails). With train.threads=1 on CPU, a run killed at any moment and resumed logs bit-identical
losses to the uninterrupted run: eval and samples draw from their own fixed generators.
SIGINT/SIGTERM/SIGHUP save a checkpoint and exit 130 (a signal during an eval abandons the eval, which
the resumed run then does first); a
NaN/inf loss or gradient norm stops without saving (exit 3), keeping the last good checkpoint.
One craft-train at a time writes a run directory: it holds an flock on RUN_DIR/train.lock.

Several processes (torchrun): gloo on CPU, nccl with one GPU per process; rank 0 alone writes
checkpoints, logs and samples; out_dir must be on a filesystem that every node sees.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import click
import numpy as np
import torch

from craft import __version__
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import EarlyStopping, MetricsLog, write_sample
from craft.checkpoint import TrainState
from craft.config import BOUNDS, Config, ConfigError, load_config, resumed_config, save_config
from craft.data import (
    Corpus,
    DataError,
    TokenData,
    check_splits_before_writing,
    check_tokenizer,
    count_chars,
    describe,
    load_tokenizer,
    prepare_tokens,
    read_info,
    sample_windows,
    save_tokenizer,
    train_tokenizer,
)
from craft.distributed import Distributed
from craft.model import Transformer, build_model
from craft.runtime.command import EXIT_OS_ERROR, TERMINATING_SIGNALS, OneLineErrors, OptionalOutput, echo_error
from craft.runtime.tokenizer import Tokenizer

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class TrainError(RuntimeError):
    """The run cannot go on (loss diverged); the last good checkpoint is kept."""


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to train.lr over
    warmup_steps, then cosine decay to train.min_lr at train.lr_decay_steps (constant after)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.lr_decay_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def prepare_run(
    cfg: Config,
    resume: bool,
    overwrite: bool,
    dist: Distributed,
    log=print,
    lock: rd.RunLock | None = None,
    scope: ExitStack | None = None,
) -> tuple[Tokenizer, TokenData]:
    """Tokenizer and token file of the run (trained / built by rank 0, reused on resume), with
    `lock` taken as soon as the run directory exists.

    A new run is checked as far as it can be before out_dir exists, and a refusal after that
    (a corpus shorter than the context) removes what it made: the corrected rerun starts clean.
    A resume uses the tokenizer of the run's tokenizer.kind, and only the one its tokens were
    made with. With several processes the run directory must be on a filesystem that all see.
    """
    run_dir = Path(cfg.out_dir)
    if dist.main:
        rd.check_out_dir(run_dir)
        if lock is not None and run_dir.is_dir():
            lock.acquire()
    # Rank 0 alone: by the time another rank looks, rank 0 may have written this run's own tokenizer.
    # A new run replaces or deletes these: the user's own config.yaml or step-000777.pt went unasked.
    existing = rd.run_files(run_dir) if dist.main and not resume and run_dir.is_dir() else []
    if existing and not rd.is_run(run_dir, lock):
        raise rd.not_a_run(run_dir, existing)  # with or without --overwrite: its files are not a run's
    if existing and not overwrite:
        if not any(p.name == rd.CONFIG or p.suffix == ".pt" for p in existing):  # no config or checkpoint to resume
            raise rd.RunDirError(
                f"{run_dir} holds a run that never began training (no {rd.CONFIG}); start it again with "
                "--overwrite, or choose another out_dir=..."
            )
        raise rd.RunDirError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
            "choose another out_dir=..., or pass --overwrite"
        )
    corpus = Corpus(cfg.data.path)
    if dist.main and run_dir.is_dir():
        rd.remove_temp_files(run_dir)  # left by a run killed mid-write
    if dist.main and not resume:
        if count_chars(corpus) == 0:
            raise DataError(
                f"corpus {corpus.name} is empty; point data.path at a file (or folder of .txt files) with text"
            )
        log(f"training {cfg.tokenizer.kind} tokenizer on {corpus.name} ...")
        tokenizer = train_tokenizer(cfg, corpus)
        check_vocab_size(cfg, tokenizer)
        if overwrite:  # only once nothing is left to refuse: a refused --overwrite deleted the run it was to replace
            check_splits_before_writing(cfg, corpus, tokenizer)
            rd.clear_run(run_dir, lock)
        with ExitStack() as own:  # `scope`, where given, keeps the new run's clean-up armed after we return
            (scope or own).enter_context(rd.new_run(run_dir, lock))
            save_tokenizer(tokenizer, run_dir)
            data = tokenize(cfg, corpus, tokenizer)
    elif dist.main:
        tokenizer = load_tokenizer(run_dir, cfg.tokenizer.kind)
        if tokenizer is None:
            raise rd.RunDirError(
                f"{run_dir} has no tokenizer ({rd.SP_TOKENIZER} or {rd.CHAR_TOKENIZER}) to resume with; "
                "start it again with --overwrite"
            )
        check_tokenizer(run_dir, tokenizer)
        made_from = (read_info(run_dir) or {}).get("corpus_fingerprint")
        if made_from is not None and made_from != corpus.fingerprint():  # exactness is lost: say so
            log(
                f"warning: the corpus {corpus.name} changed since this run's tokens were made; they are made again "
                "and training goes on over the new text (its val split, and so best.pt's val loss, change too)"
            )
        data = tokenize(cfg, corpus, tokenizer)
    dist.barrier()
    if not dist.main:
        tokenizer = load_tokenizer(run_dir, cfg.tokenizer.kind)
        if tokenizer is None:
            raise rd.RunDirError(
                f"rank {dist.rank} does not see {run_dir}'s tokenizer; put out_dir on a filesystem shared by all nodes"
            )
        data = prepare_tokens(cfg, corpus, tokenizer, run_dir)
    check_vocab_size(cfg, tokenizer)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    return tokenizer, data


def check_vocab_size(cfg: Config, tokenizer: Tokenizer) -> None:
    largest = BOUNDS["model.vocab_size"][1]
    if tokenizer.vocab_size > largest:  # a char tokenizer over a corpus of every Unicode character
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size:,} tokens, more than a model takes ({largest:,}); "
            "use tokenizer.kind=sentencepiece, or a corpus with fewer distinct characters"
        )
    if 0 < cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            "set model.vocab_size=0"
        )


def tokenize(cfg: Config, corpus: Corpus, tokenizer: Tokenizer) -> TokenData:
    progress = progress_bar(count_chars(corpus), "tokenizing", unit="char")
    try:
        return prepare_tokens(cfg, corpus, tokenizer, Path(cfg.out_dir), progress=progress.update)
    finally:
        progress.close()


def progress_bar(total: int, desc: str, file: OptionalOutput | None = None, **kw):
    from tqdm import tqdm

    file = file or OptionalOutput(sys.stderr)
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None, file=file, **kw)


def new_state(cfg: Config, dist: Distributed) -> TrainState:
    """Model (the same initial weights on every rank), AdamW, the schedule and the data RNG, seeded."""
    if cfg.train.threads:  # more threads than CPUs only slow it down (4096 on 2 cores: 170x slower)
        from craft.runtime.estimate import usable_cpus

        torch.set_num_threads(min(cfg.train.threads, usable_cpus()))
    check_fits_in_memory(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dist.device)
    if dist.enabled:
        torch.manual_seed(cfg.train.seed + dist.rank)  # but each rank its own dropout stream
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.train.lr)
    data_rng = np.random.default_rng([cfg.train.seed, dist.rank])
    return TrainState(
        model,
        optimizer,
        scheduler,
        data_rng,
        EarlyStopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta),
    )


TRAIN_BYTES_PER_PARAMETER = 16  # float32 weights, gradients and AdamW's two moments; activations come on top


def check_fits_in_memory(cfg: Config) -> None:
    """ConfigError when the model's weights, gradients and optimizer state alone exceed the memory
    this process can get: the kernel would kill it without a word (exit 137) while building it.
    The count comes from the model built on the meta device (no memory)."""
    from craft.runtime.estimate import available_memory_mb

    available = available_memory_mb()
    if available is None:
        return
    with torch.device("meta"):
        parameters = build_model(cfg.model).num_parameters()
    needed = parameters * TRAIN_BYTES_PER_PARAMETER / 2**20
    if needed > available:
        raise ConfigError(
            f"a model of {parameters:,} parameters needs about {needed / 1024:,.1f} GB to train (weights, "
            f"gradients, AdamW state), more than the {available / 1024:,.1f} GB free; lower model.dim, "
            "model.n_layer or model.ffn_dim"
        )


def build_optimizer(model: Transformer, cfg: Config) -> torch.optim.AdamW:
    """AdamW with decay on matrices and embeddings, none on norms; the fused kernel (one op for
    all parameters: measured as fast as or faster than the for-loop and foreach versions here)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=True)


def batch_to(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(batch)  # shares the sampled array's memory: no copy on CPU
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: Transformer, tokens: np.ndarray, cfg: Config, autocast, dist: Distributed, stop=None
) -> float | None:
    """Mean loss over train.eval_iters batches of the split: the same batches every call (a
    fixed RNG that leaves the training stream alone), shared out over the ranks. None when
    `stop()` turns true between batches (a signal: a long eval must not delay the exit)."""
    model.eval()
    rng = np.random.default_rng(cfg.train.seed + 1)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(cfg.train.eval_iters):
        if stop is not None and stop():
            model.train()
            return None
        batch = sample_windows(tokens, cfg.train.batch_size, cfg.model.context_length, rng)
        if i % dist.world != dist.rank:
            continue
        batch = batch_to(batch, device)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.item()
    model.train()
    return dist.all_sum([total])[0] / cfg.train.eval_iters


class Signals:
    """SIGINT / SIGTERM / SIGHUP (the terminal closed) only set `received` while active, so the loop
    can save before it stops."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self) -> "Signals":
        # nohup's ignored SIGHUP stays ignored: the run outlives the session, as the user asked
        hangup = [s for s in TERMINATING_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN or s == signal.SIGTERM]
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, *hangup)}
        return self

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class TrainStep:
    """One optimizer step: forward + backward over train.grad_accum micro-batches (gradients summed,
    DDP syncing on the last), the loss averaged over ranks, gradient clipping, the NaN guard, AdamW
    and the schedule. The first step of a compiled model falls back to eager if compiling fails."""

    def __init__(self, state: TrainState, cfg: Config, dist: Distributed, log=print):
        self.state, self.cfg, self.dist, self.log = state, cfg, dist, log
        device = dist.device
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(
                state.model, device_ids=[device.index] if device.type == "cuda" else None
            )
            if dist.enabled
            else None
        )
        self.eager = self.ddp or state.model
        self.net = (
            torch.compile(self.eager) if cfg.train.compile else self.eager
        )  # the training graph only; eval and samples run eager
        self.compile_pending = cfg.train.compile
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16" else nullcontext()
        )

    def __call__(self, tokens: np.ndarray, signals: Signals) -> float:
        """Take the step; returns its loss (mean over ranks). One collective carries that loss and
        whether any rank was signalled (then `signals.received` is set on every rank)."""
        t, state = self.cfg.train, self.state
        loss_sum = self.forward_backward_first(tokens) if self.compile_pending else self.forward_backward(tokens)
        loss, signalled = self.dist.all_sum([loss_sum.item() / t.grad_accum, float(signals.received is not None)])
        loss /= self.dist.world
        if signalled and signals.received is None:
            signals.received = signal.SIGTERM
        grad_norm = torch.nn.utils.clip_grad_norm_(
            state.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")
        ).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
            saved = (Path(self.cfg.out_dir) / rd.CHECKPOINT).exists()
            raise TrainError(
                f"{what} at step {state.step + 1}; stopped without saving, "
                f"{'the last good checkpoint is kept' if saved else 'none was saved before'}. "
                f"Lower train.lr (now {t.lr}) or set train.grad_clip (now {t.grad_clip}), then start again"
                + ("" if saved else f" with --overwrite (craft-train out_dir={self.cfg.out_dir} --overwrite ...)")
            )
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        return loss

    def forward_backward(self, tokens: np.ndarray) -> torch.Tensor:
        """Gradients of the step's micro-batches, summed; returns the summed loss."""
        t, accum, device = self.cfg.train, self.cfg.train.grad_accum, self.dist.device
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = batch_to(
                sample_windows(tokens, t.batch_size, self.cfg.model.context_length, self.state.data_rng), device
            )
            with self.ddp.no_sync() if self.ddp is not None and micro < accum - 1 else nullcontext():
                with self.autocast:
                    _, loss = self.net(batch[:, :-1], batch[:, 1:])
                (loss / accum).backward()
            loss_sum += loss.detach()
        return loss_sum

    def forward_backward_first(self, tokens: np.ndarray) -> torch.Tensor:
        """forward_backward through torch.compile, or, where compiling fails, eager on the same batches."""
        self.compile_pending = False
        data_position = copy.deepcopy(self.state.data_rng.bit_generator.state)
        try:
            return self.forward_backward(tokens)
        except Exception as e:  # noqa: BLE001 - any compiler failure (no C++ compiler, unsupported op, ...)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"warning: torch.compile does not work here ({type(e).__name__}: {reason}); training without it")
            self.state.optimizer.zero_grad(set_to_none=True)
            self.state.data_rng.bit_generator.state = data_position
            self.net = self.eager
            return self.forward_backward(tokens)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train as cfg says, writing cfg.out_dir; returns the final metrics. craft-train's body."""
    dist = Distributed()
    lock = rd.RunLock(Path(cfg.out_dir))
    try:
        metrics = _train(cfg, dist, lock, resume, overwrite, log if dist.main else (lambda *a, **k: None))
        dist.barrier()  # every rank done before any tears gloo down: a rank still on the wire would abort
        return metrics
    except BaseException as e:
        refused = isinstance(e, rd.RunDirError) or not rd.is_run(Path(cfg.out_dir), lock)
        if lock.created and lock.fd is not None and not resume and refused:  # held and made by this process
            lock.path.unlink(missing_ok=True)  # refused before the run began (an empty corpus): leave nothing
        raise
    finally:
        lock.release()
        dist.close()


def _train(cfg: Config, dist: Distributed, lock: rd.RunLock, resume: bool, overwrite: bool, log) -> dict:
    run_dir, t = Path(cfg.out_dir), cfg.train
    # A new run interrupted before its config.yaml is written (building a large model takes a while)
    # leaves nothing behind, so the same command runs again: new_run's clean-up stays armed till then.
    with ExitStack() as clean_up:
        tokenizer, data = prepare_run(cfg, resume, overwrite, dist, log, lock, scope=clean_up)
        state = new_state(cfg, dist)
        if resume:
            path, digest = ckpt.resume(state, cfg, dist, log)
            if state.step >= t.max_steps and state.step_done:
                raise rd.RunDirError(
                    f"{run_dir} already reached step {state.step} of train.max_steps={t.max_steps}; "
                    f"to train further pass a larger one, e.g. --resume {run_dir} train.max_steps={2 * state.step}"
                )
            log(f"resuming {run_dir} from {path.name} at step {state.step} (sha256 {digest[:12]})")
        dist.barrier()  # every rank has read its checkpoint before rank 0 tidies the directory
        if dist.main:
            save_config(cfg, run_dir / rd.CONFIG)
            rd.truncate_samples(run_dir, state.step)
            ckpt.drop_after(run_dir, state.step)
    log_start(cfg, state.model, data, dist, log)

    train_step = TrainStep(state, cfg, dist, log)
    metrics = MetricsLog(run_dir, enabled=dist.main, resume_step=state.step if resume else None)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context_length * dist.world
    result, val = {"stopped": "max_steps"}, None
    state.started = time.perf_counter()
    step_time, steps_timed = 0.0, 0  # time in training steps (not eval / checkpoints) since the last log
    state.model.train()
    # With several processes every rank must finish an eval (it ends in a collective), so only a
    # single process abandons one when signalled.
    stop_eval = None if dist.enabled else (lambda: signals.received is not None)
    try:
        err = OptionalOutput(sys.stderr)
        with Signals() as signals, progress_bar(t.max_steps, "training", err, unit="step", initial=state.step) as bar:
            loss = None  # a resumed step whose eval was abandoned has no train loss in this process
            while state.step < t.max_steps or not state.step_done:
                if state.step_done:  # else resumed with the step trained, its eval and sample still to do
                    started = time.perf_counter()
                    loss = train_step(data.train, signals)
                    state.step, state.step_done = state.step + 1, False
                    step_time, steps_timed = step_time + time.perf_counter() - started, steps_timed + 1
                    bar.update(1)
                    if state.step % t.log_interval == 0 or state.step in (1, t.max_steps):
                        tokens_per_s = tokens_per_step * steps_timed / max(step_time, 1e-9)
                        step_time, steps_timed = 0.0, 0
                        metrics.write(
                            {
                                "event": "train",
                                "step": state.step,
                                "loss": loss,
                                "lr": state.scheduler.get_last_lr()[0],
                                "tokens_per_s": tokens_per_s,
                                "elapsed_s": state.elapsed_s,
                            }
                        )
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                last = state.step >= t.max_steps
                if state.step % t.eval_interval == 0 or last:
                    evaluated = evaluate(state.model, data.val, cfg, train_step.autocast, dist, stop_eval)
                    if evaluated is None:  # abandoned for a signal: saved undone, a resume evaluates this step
                        ckpt.save(state, cfg, dist)
                        result["stopped"] = stopped_by_signal(signals, run_dir, state.step, log)
                        break
                    val = evaluated
                    metrics.write(
                        {"event": "eval", "step": state.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
                    )
                    if dist.main:
                        trained = "" if loss is None else f"train loss {loss:.4f}, "
                        bar.write(
                            f"step {state.step}: {trained}val loss {val:.4f}, val ppl {math.exp(min(val, 50.0)):.2f}",
                            file=err,
                        )
                    if val < state.best_val:
                        state.best_val = val
                        ckpt.save(state, cfg, dist, best=True)
                    if state.stopper.update(val):
                        result["stopped"] = (
                            f"early stopping: val loss did not improve by more than {t.early_stop_min_delta} "
                            f"in {t.early_stop_patience} evals (best {state.best_val:.4f})"
                        )
                final = last or result["stopped"] != "max_steps"
                # The sample before the checkpoint: a kill between them then re-runs the step, sample included.
                if dist.main and final:
                    sample = write_sample(state.model, tokenizer, cfg, state.step, run_dir, metrics)
                    log(f"sample at step {state.step}:\n{sample}\n")
                elif dist.main and t.sample_interval and state.step % t.sample_interval == 0:
                    sample = write_sample(state.model, tokenizer, cfg, state.step, run_dir, metrics)
                    log(f"sample at step {state.step}: {sample!r}")
                state.step_done = True
                if state.step % t.checkpoint_interval == 0 or final or signals.received is not None:
                    ckpt.save(state, cfg, dist)
                if final:
                    if result["stopped"] != "max_steps":
                        log(result["stopped"])
                    break
                if signals.received is not None:
                    result["stopped"] = stopped_by_signal(signals, run_dir, state.step, log)
                    break
    finally:
        metrics.close()
    return {
        **result,
        "step": state.step,
        "val_loss": val,
        "best_val_loss": state.best_val,
        "unigram_entropy": data.unigram_entropy(),
        "elapsed_s": time.perf_counter() - state.started,
    }


def stopped_by_signal(signals: Signals, run_dir: Path, step: int, log) -> str:
    """The run's stop reason for the signal received, after its checkpoint at `step` was saved."""
    stopped = f"signal {signal.Signals(signals.received).name}"
    log(f"{stopped}: saved {run_dir / rd.CHECKPOINT} at step {step}; continue with --resume {run_dir}")
    return stopped


def log_start(cfg: Config, model: Transformer, data: TokenData, dist: Distributed, log) -> None:
    m = cfg.model
    mixing = "recurrent" if m.arch == "recurrent" else f"{m.n_head} heads ({m.kv_heads} kv)"
    log(
        f"craft {__version__} | {m.n_layer} layers, dim {m.dim}, {mixing}, context {m.context_length}, "
        f"vocab {m.vocab_size}: {model.num_parameters():,} parameters"
    )
    log(f"data: {describe(data)} | unigram entropy {data.unigram_entropy():.3f} nats/token")
    if dist.enabled:
        log(f"distributed: {dist.world} processes ({torch.distributed.get_backend()}), device {dist.device}")


@click.command(
    name="craft-train",
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--config",
    "-c",
    "config",
    default=None,
    metavar="NAME|FILE",
    help="Preset in configs/ (tiny, small, base, ...) or a YAML file.  [default: tiny]",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="RUN_DIR",
    help="Continue the run in RUN_DIR from its newest good checkpoint "
    "(overrides may extend it, e.g. train.max_steps=4000).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in out_dir instead of refusing.")
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="RUN_DIR",
    help="Write RUN_DIR/loss.png (train/val loss and learning rate) and exit; needs matplotlib.",
)
@click.version_option(__version__, prog_name="craft-train")
def main(overrides, config, resume, overwrite, plot_dir):
    """Train a small Llama-style model and write its run directory.

    With no arguments: the tiny preset on the bundled corpus (Python's documentation) into
    runs/tiny. KEY=VALUE overrides any config key, e.g. model.n_layer=6 train.max_steps=2000
    data.path=corpus.txt tokenizer.kind=char out_dir=runs/mine. Exit codes: 0 done,
    1 a file could not be read or written (a full disk: the last checkpoint is kept), 2 bad
    input or the run is in use, 3 loss diverged, 130 interrupted (Ctrl-C; SIGTERM once training
    has begun, and SIGHUP, which save a checkpoint first), 143 SIGTERM (129 SIGHUP) before training began.
    """
    try:
        ignored = [
            name
            for name, given in (
                ("--config", config is not None),
                ("--resume", resume is not None),
                ("--overwrite", overwrite),
                ("KEY=VALUE", bool(overrides)),
            )
            if given
        ]
        if plot_dir is not None and ignored:
            raise ConfigError(f"--plot only draws a run's plot, so {', '.join(ignored)} would do nothing; drop them")
        if resume is not None and overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces one; drop one of them")
        if plot_dir is not None:
            from craft.callbacks import plot_run

            click.echo(f"wrote {plot_run(plot_dir)}")
            return
        if resume is not None:
            if config is not None:
                raise ConfigError(
                    "--resume takes the run's own config.yaml; drop --config (KEY=VALUE overrides still apply)"
                )
            cfg = resumed_config(resume, list(overrides))
        else:
            cfg = load_config(config, list(overrides))
        out = OptionalOutput(sys.stdout)
        result = train(cfg, resume=resume is not None, overwrite=overwrite, log=out.echo)
    except (ConfigError, DataError, rd.RunDirError) as e:
        echo_error("craft-train", e)
        sys.exit(EXIT_USAGE)
    except TrainError as e:
        echo_error("craft-train", e)
        sys.exit(EXIT_DIVERGED)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):  # torch's CPU allocator
            raise
        fix = (  # --overwrite would delete the run being resumed
            f"close other programs, or lower train.batch_size: --resume {resume} train.batch_size=N"
            if resume is not None
            else "lower train.batch_size (or model.dim, model.n_layer, model.context_length) and start again with "
            "--overwrite (or --resume if a checkpoint was saved)"
        )
        echo_error("craft-train", f"out of memory building or training the model; {fix}")
        sys.exit(EXIT_OS_ERROR)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports for all
        sys.exit(EXIT_INTERRUPTED if result["stopped"].startswith("signal") else 0)
    val = result["val_loss"]
    out.echo(
        f"done: step {result['step']} ({result['stopped']}) in {result['elapsed_s']:.1f}s | "
        f"val loss {val:.4f} (best {result['best_val_loss']:.4f}) "
        f"vs unigram entropy {result['unigram_entropy']:.4f} nats/token | "
        f"run directory: {cfg.out_dir}"
        if val is not None
        else f"stopped at step {result['step']} ({result['stopped']})"
    )
    if result["stopped"].startswith("signal"):
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
