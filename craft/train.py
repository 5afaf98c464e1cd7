"""craft-train: train the model of a YAML config on a corpus and write the run directory.

    craft-train                                         tiny preset on the bundled corpus
    craft-train --config small data.path=my.txt         a preset, one override
    craft-train --resume runs/small train.max_steps=4000  continue a run (exactly)
    craft-train --plot runs/small                       loss.png of the run (matplotlib)
    torchrun --standalone --nproc_per_node 2 -m craft.train ...   data-parallel (DDP) on 2 processes

The loop: AdamW (fused), linear warmup + cosine decay over train.max_steps, gradient clipping and
accumulation, optional bf16 autocast and torch.compile (eager, with a warning, where compiling
fails), periodic eval (val loss, perplexity), checkpoints (atomic, hashed, periodic + best.pt),
samples and early stopping (callbacks.py), metrics.jsonl (+ TensorBoard when installed).

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, early-stopping state and
every rank's RNG states (numpy for the data windows, torch, CUDA); eval and samples draw from
their own fixed generators. With train.threads=1 on CPU, a run killed at any moment and resumed
logs bit-identical losses to the uninterrupted run. SIGINT/SIGTERM save a checkpoint and exit 130;
a NaN/inf loss or gradient norm stops without saving (exit 3), keeping the last good checkpoint.

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
from contextlib import nullcontext
from pathlib import Path

import click
import numpy as np
import torch

from craft import __version__
from craft import run_dir as rd
from craft.callbacks import EarlyStopping, MetricsLog, write_sample
from craft.config import Config, ConfigError, config_from_dict, load_config, save_config
from craft.data import Corpus, DataError, count_chars, describe, load_tokenizer, prepare_tokens, sample_windows, save_tokenizer, train_tokenizer
from craft.distributed import Distributed
from craft.model import Transformer
from craft.runtime.command import OneLineErrors

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class TrainError(RuntimeError):
    """The run cannot go on (loss diverged); the last good checkpoint is kept."""


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to train.lr over
    warmup_steps, then cosine decay to train.min_lr at train.max_steps (constant after)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def prepare_run(cfg: Config, run_dir: Path, resume: bool, dist: Distributed, log=print):
    """Tokenizer and token file for the run (trained / built by rank 0, reused on resume).

    With several processes the run directory must be on a filesystem that all of them see.
    """
    corpus = Corpus(cfg.data.path)
    tokenizer = load_tokenizer(run_dir) if resume else None
    if dist.main:
        if tokenizer is None:  # before the run directory exists: a corpus it cannot read leaves nothing behind
            log(f"training {cfg.tokenizer.kind} tokenizer on {corpus.name} ...")
            tokenizer = train_tokenizer(cfg, corpus)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tokenizer, run_dir)
        progress = progress_bar(count_chars(corpus), "tokenizing", unit="char")
        data = prepare_tokens(cfg, corpus, tokenizer, run_dir, progress=progress.update)
        progress.close()
    dist.barrier()
    if not dist.main:
        tokenizer = load_tokenizer(run_dir)
        if tokenizer is None:
            raise rd.RunDirError(f"rank {dist.rank} does not see {run_dir}'s tokenizer; put out_dir on a filesystem shared by all nodes")
        data = prepare_tokens(cfg, corpus, tokenizer, run_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; set model.vocab_size=0")
    return tokenizer, data


def progress_bar(total: int, desc: str, **kw):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None, file=sys.stderr, **kw)


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
def evaluate(model: Transformer, tokens: np.ndarray, cfg: Config, autocast, dist: Distributed) -> float:
    """Mean loss over train.eval_iters batches of the split: the same batches every call (a
    fixed RNG that leaves the training stream alone), shared out over the ranks."""
    model.eval()
    rng = np.random.default_rng(cfg.train.seed + 1)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(cfg.train.eval_iters):
        batch = sample_windows(tokens, cfg.train.batch_size, cfg.model.context_length, rng)
        if i % dist.world != dist.rank:
            continue
        batch = batch_to(batch, device)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.item()
    model.train()
    return dist.all_sum([total])[0] / cfg.train.eval_iters


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Train as cfg says, writing cfg.out_dir; returns the final metrics. craft-train's body."""
    dist = Distributed()
    try:
        return _train(cfg, dist, resume, overwrite, log if dist.main else (lambda *a, **k: None))
    finally:
        dist.close()


def _train(cfg: Config, dist: Distributed, resume: bool, overwrite: bool, log) -> dict:
    run_dir = Path(cfg.out_dir)
    if not resume and rd.tokenizer_path(run_dir) and not overwrite:
        raise rd.RunDirError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, choose another out_dir=..., or pass --overwrite")
    if dist.main and overwrite and not resume:
        rd.clear_run(run_dir)
    if dist.main and run_dir.is_dir():
        rd.remove_temp_files(run_dir)  # left by a run killed mid-write
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    tokenizer, data = prepare_run(cfg, run_dir, resume, dist, log)
    device = dist.device

    model = Transformer(cfg.model).to(device)  # same seed on every rank: the same initial weights
    if dist.enabled:
        torch.manual_seed(cfg.train.seed + dist.rank)  # but each rank its own dropout stream
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.train.lr)
    rng = np.random.default_rng([cfg.train.seed, dist.rank])  # the data position: which windows come next
    step, best_val, elapsed_before = 0, float("inf"), 0.0
    stopper = EarlyStopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
    if resume:
        state, digest, path = rd.load_latest_checkpoint(run_dir, warn=log)
        step = state["step"]
        if step >= cfg.train.max_steps:
            raise rd.RunDirError(f"{run_dir} already reached step {step} of train.max_steps={cfg.train.max_steps}; "
                                 f"to train further pass a larger one, e.g. --resume {run_dir} train.max_steps={2 * step}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        best_val, elapsed_before = state["best_val_loss"], state.get("elapsed_s", 0.0)
        stopper.load_state_dict(state["early_stopping"])
        rngs = state["rng"]
        if isinstance(rngs["torch"], torch.Tensor):  # written by craft 0.1.0's first trainer: one torch state
            rngs = {**rngs, "torch": [rngs["torch"]] * len(rngs["data"])}
        if len(rngs["data"]) == dist.world:
            rng.bit_generator.state = rngs["data"][dist.rank]
            torch.set_rng_state(rngs["torch"][dist.rank])
            if device.type == "cuda" and rngs.get("cuda"):
                torch.cuda.set_rng_state(rngs["cuda"][dist.rank])
        else:  # another number of processes: the run goes on, but not the same random stream
            log(f"warning: {path.name} was written by {len(rngs['data'])} processes, this run has {dist.world}; "
                "data order continues from fresh seeds (not an exact continuation)")
            rng = np.random.default_rng([cfg.train.seed, dist.rank, step])
        log(f"resuming {run_dir} from {path.name} at step {step} (sha256 {digest[:12]})")
    dist.barrier()  # every rank has read its checkpoint before rank 0 tidies the directory
    if dist.main:
        save_config(cfg, run_dir / rd.CONFIG)
        rd.truncate_samples(run_dir, step)
        if resume:
            rd.drop_checkpoints_after(run_dir, step)

    log(f"craft {__version__} | {cfg.model.n_layer} layers, dim {cfg.model.dim}, {cfg.model.n_head} heads "
        f"({cfg.model.kv_heads} kv), context {cfg.model.context_length}, vocab {cfg.model.vocab_size}: "
        f"{model.num_parameters():,} parameters")
    log(f"data: {describe(data)} | unigram entropy {data.unigram_entropy():.3f} nats/token")
    if dist.enabled:
        log(f"distributed: {dist.world} processes ({torch.distributed.get_backend()}), device {device}")

    ddp = None
    train_model = model
    if dist.enabled:
        ddp = train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)  # the training graph only; eval and sampling run eager
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16" else nullcontext()
    metrics = MetricsLog(run_dir, enabled=dist.main, resume_step=step if resume else None)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save(path: Path | None = None) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        rng_states = dist.gather({"data": rng.bit_generator.state, "torch": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state().cpu() if device.type == "cuda" else None})
        if not dist.main:
            return
        state = {
            "format": rd.CHECKPOINT_FORMAT, "craft_version": __version__, "config": cfg.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "best_val_loss": best_val, "early_stopping": stopper.state_dict(),
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
            "rng": {"data": [r["data"] for r in rng_states], "torch": [r["torch"] for r in rng_states],
                    "cuda": [r["cuda"] for r in rng_states] if device.type == "cuda" else []},
        }
        if path is not None:
            rd.save_checkpoint(state, path)
        else:
            rd.save_periodic_checkpoint(state, run_dir, step, cfg.train.keep_last)

    accum = cfg.train.grad_accum

    def forward_backward(net) -> torch.Tensor:
        """Forward and backward over the step's micro-batches (gradients summed, DDP syncing only
        on the last); returns the summed loss."""
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = batch_to(sample_windows(data.train, cfg.train.batch_size, cfg.model.context_length, rng), device)
            sync = ddp.no_sync() if ddp is not None and micro < accum - 1 else nullcontext()
            with sync:
                with autocast:
                    _, loss = net(batch[:, :-1], batch[:, 1:])
                (loss / accum).backward()
            loss_sum += loss.detach()
        return loss_sum

    compile_pending = cfg.train.compile
    tokens_per_step = cfg.train.batch_size * accum * cfg.model.context_length * dist.world
    bar = progress_bar(cfg.train.max_steps, "training", unit="step", initial=step)
    result = {"step": step, "stopped": "max_steps"}
    t0 = time.perf_counter()
    interval_time, interval_steps = 0.0, 0  # time spent in training steps (not eval / checkpoints) since the last log
    val = None
    model.train()
    try:
        try:
            while step < cfg.train.max_steps:
                t_step = time.perf_counter()
                if compile_pending:  # the first compiled step: fall back to eager if compiling fails here
                    data_state = copy.deepcopy(rng.bit_generator.state)
                    try:
                        loss_sum = forward_backward(train_model)
                    except Exception as e:  # noqa: BLE001 - any compiler failure (no C++ compiler, unsupported op, ...)
                        reason = (str(e).strip().splitlines() or [""])[0][:200]
                        log(f"warning: torch.compile does not work here ({type(e).__name__}: {reason}); training without it")
                        optimizer.zero_grad(set_to_none=True)
                        rng.bit_generator.state = data_state  # the same batches again, eager
                        train_model = ddp or model
                        loss_sum = forward_backward(train_model)
                    compile_pending = False
                else:
                    loss_sum = forward_backward(train_model)
                # one collective a step: the mean loss over ranks and whether any rank was signalled
                loss_value, signalled = dist.all_sum([loss_sum.item() / accum, float(stop["signal"] is not None)])
                loss_value /= dist.world
                if signalled and stop["signal"] is None:
                    stop["signal"] = signal.SIGTERM
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
                    what = f"loss became {loss_value}" if not math.isfinite(loss_value) else f"gradient norm became {grad_norm.item()}"
                    raise TrainError(f"{what} at step {step + 1}; stopped without saving, the last good checkpoint is kept. "
                                     f"Lower train.lr (now {cfg.train.lr}) or set train.grad_clip (now {cfg.train.grad_clip}), then start again")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                interval_time += time.perf_counter() - t_step
                interval_steps += 1
                bar.update(1)
                last = step == cfg.train.max_steps
                if step % cfg.train.log_interval == 0 or last or step == 1:
                    tps = tokens_per_step * interval_steps / max(interval_time, 1e-9)
                    interval_time, interval_steps = 0.0, 0
                    metrics.write({"event": "train", "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                   "tokens_per_s": tps, "elapsed_s": elapsed_before + time.perf_counter() - t0})
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                if step % cfg.train.eval_interval == 0 or last:
                    val = evaluate(model, data.val, cfg, autocast, dist)
                    metrics.write({"event": "eval", "step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
                    if dist.main:
                        bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {val:.4f}, val ppl {math.exp(min(val, 50.0)):.2f}", file=sys.stderr)
                    if val < best_val:
                        best_val = val
                        save(run_dir / rd.BEST)
                    if stopper.update(val):
                        result["stopped"] = (f"early stopping: val loss did not improve by more than {cfg.train.early_stop_min_delta} "
                                             f"in {cfg.train.early_stop_patience} evals (best {stopper.best:.4f})")
                        save()
                        log(result["stopped"])
                        break
                if step % cfg.train.checkpoint_interval == 0 or last:
                    save()
                if dist.main and cfg.train.sample_interval and step % cfg.train.sample_interval == 0 and not last:
                    text = write_sample(model, tokenizer, cfg, step, run_dir, metrics)
                    log(f"sample at step {step}: {text!r}")
                if stop["signal"] is not None:
                    if step % cfg.train.checkpoint_interval != 0 and not last:
                        save()
                    result["stopped"] = f"signal {signal.Signals(stop['signal']).name}"
                    log(f"{result['stopped']}: saved {run_dir / rd.CHECKPOINT} at step {step}; continue with --resume {run_dir}")
                    break
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if dist.main and not result["stopped"].startswith("signal"):
            sample = write_sample(model, tokenizer, cfg, step, run_dir, metrics)
            log(f"sample at step {step}:\n{sample}\n")
    finally:
        metrics.close()
    elapsed = time.perf_counter() - t0
    result.update(step=step, val_loss=val, best_val_loss=best_val, unigram_entropy=data.unigram_entropy(), elapsed_s=elapsed)
    return result


@click.command(name="craft-train", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "-c", "config", default=None, metavar="NAME|FILE", help="Preset in configs/ (tiny, small, base, ...) or a YAML file.  [default: tiny]")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="RUN_DIR", help="Continue the run in RUN_DIR from its newest good checkpoint (overrides may extend it, e.g. train.max_steps=4000).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in out_dir instead of refusing.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="RUN_DIR", help="Write RUN_DIR/loss.png (train/val loss and learning rate) and exit; needs matplotlib.")
@click.version_option(__version__, prog_name="craft-train")
def main(overrides, config, resume, overwrite, plot_dir):
    """Train a small Llama-style model and write its run directory.

    With no arguments: the tiny preset on the bundled corpus (Python's documentation) into
    runs/tiny. KEY=VALUE overrides any config key, e.g. model.n_layer=6 train.max_steps=2000
    data.path=corpus.txt tokenizer.kind=char out_dir=runs/mine. Exit codes: 0 done,
    2 bad input, 3 loss diverged, 130 interrupted (a checkpoint was saved).
    """
    try:
        if plot_dir is not None:
            from craft.callbacks import plot_run

            click.echo(f"wrote {plot_run(plot_dir)}")
            return
        if resume is not None:
            if config is not None:
                raise ConfigError("--resume takes the run's own config.yaml; drop --config (KEY=VALUE overrides still apply)")
            cfg = resumed_config(resume, list(overrides))
        else:
            cfg = load_config(config, list(overrides))
        result = train(cfg, resume=resume is not None, overwrite=overwrite, log=click.echo)
    except (ConfigError, DataError, rd.RunDirError) as e:
        click.echo(f"craft-train: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except TrainError as e:
        click.echo(f"craft-train: error: {e}", err=True)
        sys.exit(EXIT_DIVERGED)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports for all
        sys.exit(EXIT_INTERRUPTED if result["stopped"].startswith("signal") else 0)
    val = result["val_loss"]
    click.echo(f"done: step {result['step']} ({result['stopped']}) in {result['elapsed_s']:.1f}s | "
               f"val loss {val:.4f} (best {result['best_val_loss']:.4f}) vs unigram entropy {result['unigram_entropy']:.4f} nats/token | "
               f"run directory: {cfg.out_dir}" if val is not None else f"stopped at step {result['step']} ({result['stopped']})")
    if result["stopped"].startswith("signal"):
        sys.exit(EXIT_INTERRUPTED)


def resumed_config(run_dir: Path, overrides: list[str]) -> Config:
    import yaml

    from craft.config import apply_dict, parse_overrides, validate

    path = run_dir / rd.CONFIG
    if not path.is_file():
        raise rd.RunDirError(f"{run_dir} has no {rd.CONFIG}; is it a craft-train run directory?")
    cfg = config_from_dict(yaml.safe_load(path.read_text()))
    before = (cfg.to_dict()["model"], cfg.to_dict()["tokenizer"])
    apply_dict(cfg, parse_overrides(overrides))
    validate(cfg)
    if (cfg.to_dict()["model"], cfg.to_dict()["tokenizer"]) != before:
        raise ConfigError("--resume cannot change model.* or tokenizer.* keys; start a new run with another out_dir=...")
    cfg.out_dir = str(run_dir)
    return cfg


if __name__ == "__main__":
    main()
