"""What the training loop reports and decides besides the step itself.

MetricsLog    metrics.jsonl (always) and TensorBoard event files in the run directory (when
              the `tensorboard` package is installed)
EarlyStopping stop when val loss has not improved by min_delta for `patience` evals
write_sample  a text sample from the model into samples.txt and the log
plot_run      loss.png of train/val loss and learning rate (matplotlib, optional)

metrics.jsonl schema, one object per line:
    {"event": "train", "step": int, "loss": float, "lr": float, "tokens_per_s": float, "elapsed_s": float}
    {"event": "eval",  "step": int, "val_loss": float, "val_ppl": float}
    {"event": "sample", "step": int, "text": str}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from craft import run_dir as rd

METRIC_FIELDS = {
    "train": {"step": int, "loss": float, "lr": float, "tokens_per_s": float, "elapsed_s": float},
    "eval": {"step": int, "val_loss": float, "val_ppl": float},
    "sample": {"step": int, "text": str},
}


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed as written) plus TensorBoard event files
    written straight into the run directory when `tensorboard` is installed."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        """A new log, or with resume_step the run's log with records past that step dropped (a
        killed run may have logged steps that the resumed run logs again)."""
        self.enabled, self.failed = enabled, False
        self.path = Path(run_dir) / rd.METRICS
        self.tb = self.file = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [r for r in numbers(read_metrics(self.path), "step") if r["step"] <= resume_step]
            rd.atomic_write_bytes(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.file = rd.open_append(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return
        # purge_step: TensorBoard hides events at or past it written by the killed run
        self.tb = SummaryWriter(log_dir=str(run_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
        except OSError:
            self.failed = True  # reported here: close() then does not raise it again
            raise
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("event", "step") and isinstance(value, float):
                    self.tb.add_scalar(f"{record['event']}/{key}", value, record["step"])
                elif key == "text":
                    self.tb.add_text("sample", value, record["step"])

    def close(self) -> None:
        """Idempotent. A close that fails is raised (NFS reports write errors there) unless a write
        already failed and was reported; TensorBoard's writer is closed either way."""
        file, tb, self.file, self.tb = self.file, self.tb, None, None
        try:
            if file is not None:
                file.close()
        except OSError:
            if not self.failed:
                raise
        finally:
            if tb is not None:
                tb.close()


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a line that is not a JSON object is skipped (a torn last line
    from a kill mid-write, or damage: bytes that are not UTF-8, a list, nesting past the stack)."""
    records = []
    for line in Path(path).read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


MAX_METRIC = 1e15  # steps, losses and rates past this are damage: a plot axis cannot span them


def numbers(records: list[dict], *keys: str) -> list[dict]:
    """The records whose `keys` all hold finite numbers within MAX_METRIC (a damaged line can hold
    anything: a step of 10^400 or 1e308 broke the plot's axis arithmetic)."""

    def plain(value) -> bool:
        return type(value) in (int, float) and abs(value) <= MAX_METRIC  # NaN fails the comparison too

    return [r for r in records if all(plain(r.get(k)) for k in keys)]


class EarlyStopping:
    """update(val_loss) -> True when `patience` evals in a row improved the best by less than min_delta."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad_evals = math.inf, 0

    def update(self, val_loss: float) -> bool:
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        best, bad_evals = state["best"], state["bad_evals"]
        if type(best) not in (int, float) or type(bad_evals) is not int:  # compared at every eval: check now
            raise ValueError(f"early-stopping state holds {best!r:.40} / {bad_evals!r:.40}, not a loss and a count")
        self.best, self.bad_evals = best, bad_evals


def write_sample(model, tokenizer, cfg, step: int, run_dir: Path, metrics: MetricsLog) -> str:
    """Sample train.sample_tokens tokens from train.sample_prompt (temperature, top-k from the
    config); append them to samples.txt and the log (and TensorBoard). Returns the text.

    Uses its own generator seeded by (seed, step), so sampling never changes the training run's
    random stream and a resumed run writes the same samples.
    """
    import copy

    import torch

    from craft.model import generate

    t = cfg.train
    prompt = [tokenizer.bos_id] + tokenizer.encode(t.sample_prompt)
    generator = torch.Generator().manual_seed(t.seed + step)
    was_training = model.training
    sampler = (
        model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    )  # generate() runs on CPU
    ids = generate(
        sampler,
        prompt,
        t.sample_tokens,
        temperature=t.sample_temperature,
        top_k=t.sample_top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    model.train(was_training)
    text = t.sample_prompt + tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
    with rd.open_append(Path(run_dir) / rd.SAMPLES) as f:
        f.write(
            f"{rd.SAMPLE_HEADER.format(step=step)} (temperature {t.sample_temperature}, top-k {t.sample_top_k}) ---\n"
            f"{text}\n\n"
        )
    metrics.write({"event": "sample", "step": step, "text": text})
    return text


def plot_run(run_dir: Path) -> Path:
    """Write run_dir/loss.png: train and val loss (left axis) and learning rate (right axis)."""
    path = Path(run_dir) / rd.METRICS
    if not path.is_file():
        raise rd.RunDirError(f"{run_dir} has no {rd.METRICS}; is it a craft-train run directory?")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise rd.RunDirError(
            'plotting needs matplotlib: pip install matplotlib (or pip install -e ".[plot]" in Craft\'s checkout)'
        ) from None
    records = read_metrics(path)
    train = numbers([r for r in records if r.get("event") == "train"], "step", "loss", "lr")
    evals = numbers([r for r in records if r.get("event") == "eval"], "step", "val_loss")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", ls="--", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(f"{Path(run_dir).name}")
    fig.tight_layout()
    out = Path(run_dir) / rd.PLOT
    with rd.atomic_file(out) as f:  # replaces a symlink there instead of writing through it
        fig.savefig(f, format="png")
    plt.close(fig)
    return out
