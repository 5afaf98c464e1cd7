"""craft-export's body: run directory, Hugging Face directory or GGUF file -> verified, self-contained .onnx file.

    load the source (config, tokenizer, weights)  ->  weights in the artifact layout (craft.runtime.weights)
    ->  graph.build_decoder (the scheme's ops: quantize.py)  ->  metadata (config, tokenizer, ...)
    ->  verify.py (PyTorch vs ONNX Runtime, quantized perplexity)  ->  temp file, rename

Nothing is left at the output path unless the whole file was written and verified; the output
is a new path or a regular file (never a device), and an interrupted write leaves no temp file.
A run directory is read here (load_run); an imported model through craft.export.sources and
craft.export.source_tokenizer (load_imported).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from craft import __version__
from craft import run_dir as rd
from craft.checkpoint import read as read_checkpoint
from craft.config import ConfigError, ModelConfig, apply_dict, read_run_config
from craft.data import DATA_INFO, TOKENS, check_tokenizer, load_tokenizer, run_splits
from craft.export.calibration import CalibrationError, Prepared, calibration_text, prepare
from craft.export.graph import DEFAULT_OPSET, build_decoder
from craft.export.graph_recurrent import build_recurrent_decoder
from craft.export.quantize import OPS
from craft.export.sources import (
    HF,
    RUN,
    SourceError,
    check_finite,
    check_shapes,
    describe_mode,
    detect_kind,
    file_mode,
    load_source,
)
from craft.model import Transformer, build_model
from craft.runtime import artifact as A
from craft.runtime import weights as W
from craft.runtime.command import printable
from craft.runtime.generator import MAX_CHARS_PER_TOKEN
from craft.runtime.tokenizer import Tokenizer


class ExportError(ValueError):
    """Bad input to the exporter (run directory, output path, options); one line with the fix."""


class OutputWriteError(ExportError):
    """The output could not be written (disk full, permission, read-only): an OS failure, not bad input
    (craft-export exits 1, not 2); still one line, and nothing is written."""


class VerificationError(RuntimeError):
    """The exported file does not compute what the checkpoint does; carries the report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


MAX_GRAPH_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit on a message, less room for the graph and metadata
PERPLEXITY_TEXT = Path(__file__).with_name("perplexity_text.txt")  # int8 quality check of imported models
# Report figures printed and returned but not stored: the same source and flags give the same bytes
WALL_CLOCK = ("export_s", "calibration_s")


@dataclass
class LoadedRun:
    """A model ready to export: a craft-train run, or an imported model (run_dir is then its path)."""

    run_dir: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    checkpoint_sha256: str  # of the checkpoint, or of an imported model's weight files
    step: int
    val_tokens: np.ndarray | None = field(default=None, repr=False)  # perplexity text, as ids
    source_kind: str = RUN
    architecture: str = "craft"  # an imported model's own name for it (LlamaForCausalLM, llama, ...)
    chat_template: str | None = None  # the source's, if it has one
    end_of_turn_ids: tuple[int, ...] = ()  # every id that ends a reply (imported models)
    calibration_tokens: np.ndarray | None = field(default=None, repr=False)  # GPTQ's inputs (calibration.py)


def load_run(run_dir: Path, checkpoint: str = rd.CHECKPOINT) -> LoadedRun:
    """Model, tokenizer and val tokens of a craft-train run directory; ExportError if unusable."""
    run_dir = Path(run_dir)
    try:
        check_run_files(run_dir, checkpoint)
    except SourceError as e:
        raise ExportError(str(e)) from None
    try:
        cfg = read_run_config(run_dir)
        tokenizer = load_tokenizer(run_dir, cfg.tokenizer.kind)  # the run's kind: never a stray file of the other
        if tokenizer is not None:
            check_tokenizer(run_dir, tokenizer)
        splits = run_splits(run_dir, cfg.model.vocab_size)  # an id past it: an IndexError in the quality check
    except (ConfigError, rd.RunDirError) as e:
        raise ExportError(str(e)) from None
    if tokenizer is None:
        raise ExportError(
            f"{run_dir} has no tokenizer ({rd.SP_TOKENIZER} or {rd.CHAR_TOKENIZER}); "
            "training did not get far enough - rerun craft-train"
        )
    path = run_dir / checkpoint
    if not path.is_file():
        saved = sorted(p.name for p in rd.checkpoint_files(run_dir) if p.is_file())
        if saved:  # a mistyped --checkpoint
            raise ExportError(f"{run_dir} has no checkpoint '{checkpoint}'; it has {', '.join(saved[:8])}")
        raise ExportError(
            f"{path} does not exist; training has not saved a checkpoint yet "
            f"(wait for train.checkpoint_interval, or resume with craft-train --resume {run_dir})"
        )
    try:
        state, digest = read_checkpoint(path)
    except rd.RunDirError as e:
        raise ExportError(f"{e}; export another checkpoint with --checkpoint (e.g. best.pt or a step-*.pt)") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ExportError(
            f"{run_dir}'s tokenizer has {tokenizer.vocab_size} tokens, its model {cfg.model.vocab_size}: "
            "it is not this run's tokenizer; restore the run's own"
        )
    try:  # a diverged or damaged checkpoint: HF and GGUF imports are refused for it, so is a run
        check_finite(state["model"], str(path), {})
    except SourceError as e:
        raise ExportError(f"{e}; export another checkpoint with --checkpoint (e.g. best.pt or a step-*.pt)") from None
    if saved_model_config(state) != cfg.model:
        raise ExportError(
            f"{path} was trained with a different model config than {run_dir / rd.CONFIG}; "
            f"keep each run's checkpoint and config.yaml together"
        )
    tied = cfg.model.tie_embeddings  # a tied head is the embedding under a second name in a state_dict
    shapes = {name: tuple(t.shape) for name, t in state["model"].items() if not (tied and name == "output.weight")}
    try:  # before the model is built: a config.yaml that claims dim 16384 x 256 layers took 24 GB first
        check_shapes(cfg.model, shapes, "the checkpoint", {}, f"model.n_layer in {rd.CONFIG}")
    except SourceError as e:
        raise ExportError(f"{path} does not fit the model of {rd.CONFIG}: {e}") from None
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ExportError(f"{path} does not fit the model of {rd.CONFIG}: {str(e).splitlines()[0]}") from None
    model.eval()
    train, val = splits if splits is not None else (None, None)
    return LoadedRun(run_dir, cfg.model, model, tokenizer, digest, int(state["step"]), val, calibration_tokens=train)


def verified(run: LoadedRun, fp32: bytes | str, quantized: bytes | None, quantize: str, ops, log) -> dict:
    """The verification report (calibration figures included) of the float32 graph `fp32` (its bytes,
    or the path of a graph whose weights lie beside it) and the quantized one."""
    from craft.export.verify import verify

    if ops.calibration.get("calibration_tokens"):
        c = ops.calibration
        log(
            f"  calibration: {'residual stream rotated; ' if c['rotated'] else ''}GPTQ on {c['calibration_tokens']:,} "
            f"tokens, output error "
            f"{c['gptq_error_ratio']:.2f}x rounding's ({c['calibration_s']:.1f}s)"
        )
    report = verify(run, fp32, quantized, quantize, log=log)
    report.update(ops.calibration)
    return report


def float32_bytes(run: LoadedRun) -> int:
    """About how large the model's float32 graph is: its weights and RoPE tables."""
    return 4 * run.model.num_parameters() + 8 * run.config.context_length * run.config.head_dim


def quantized_bytes_estimate(run: LoadedRun, quantize: str) -> int:
    """About how large a block-quantized graph is: each weight's bits and a float32 scale per 32 (the
    embedding and head in int8 whatever the scheme), and the float32 RoPE tables."""
    bits = W.SCHEMES[quantize].weight_bits
    embedding = run.config.vocab_size * run.config.dim * (1 if run.config.tie_embeddings else 2)
    rest = run.model.num_parameters() - embedding
    rope = 8 * run.config.context_length * run.config.head_dim
    return int(rest * (bits / 8 + 4 / 32) + embedding * (1 + 4 / 32)) + rope


def check_graph_size(run: LoadedRun, quantize: str, source) -> None:
    """ExportError where the file asked for would pass protobuf's 2 GB, which one self-contained ONNX
    file cannot: a float32 one from about 520M parameters, int8 1.7B, int4 3B. (The float32
    reference a quantized export verifies against may be larger: its weights go beside it.)"""
    size = float32_bytes(run) if quantize == W.NONE else quantized_bytes_estimate(run, quantize)
    if size > MAX_GRAPH_BYTES:
        smaller = "--quantize int8 or int4" if quantize == W.NONE else "--quantize int4" if quantize == W.INT8 else ""
        raise ExportError(
            f"{source} has {run.model.num_parameters():,} parameters: as {quantize} its file would take "
            f"{size / 2**30:.1f} GB, past the 2 GB one self-contained ONNX file holds (protobuf's limit)"
            + (f"; export it with {smaller}" if smaller else "; Craft cannot compile a model this large")
        )


@contextlib.contextmanager
def reference_files(proto, output: Path) -> Iterator[tuple[str, int]]:
    """The float32 graph `proto` written as two temp files beside `output` - the graph, and its weights
    as ONNX external data - for ONNX Runtime to load by path: past 2 GB it cannot be one protobuf.
    Yields (the graph's path, both files' bytes); removed after, and swept like any temp file if the
    export is killed."""
    import onnx

    paths = []
    try:
        try:  # only the writing: an OSError of the caller's, inside the with block, is not this one
            for _ in range(2):
                handle, name = tempfile.mkstemp(
                    dir=output.parent, prefix=f".{rd.temp_stem(output.name)}.{os.getpid()}.", suffix=rd.TEMP_SUFFIX
                )
                os.close(handle)
                paths.append(Path(name))
            graph, weights = paths
            weights.unlink()  # onnx writes it anew
            onnx.save_model(proto, graph, save_as_external_data=True, location=weights.name, size_threshold=1024)
            size = graph.stat().st_size + weights.stat().st_size
        except OSError as e:
            raise OutputWriteError(
                f"cannot write the float32 reference beside {output} ({e.strerror}); it needs the model's size in "
                "free space for the export's duration"
            ) from None
        yield str(graph), size
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def pure_python_tokenizer_note(tokenizer: Tokenizer) -> str | None:
    """A log line where Craft's pure-Python tokenizer (armv6l's: the tokenizers library has no wheel
    there) cannot load the source's tokenizer.json, which the library takes (a BPE with dropout):
    the file runs everywhere else, so it is said at export, not refused; None where it loads."""
    from craft.runtime.bpe_tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer):
        return None
    try:
        HFTokenizer.from_bytes(tokenizer.to_bytes(), use_library=False)
    except ValueError as e:
        reason = printable(str(e))
        return f"  note: without the tokenizers library (armv6l) craft-run cannot load this tokenizer: {reason}"
    return None


def check_run_files(run_dir: Path, checkpoint: str) -> None:
    """ExportError unless `run_dir` is a directory whose files are regular files where present (a
    missing or misplaced one is for the readers to explain): a FIFO or device in place of one would
    block the read forever or never end. SourceError where one cannot be stat'ed."""
    mode = file_mode(run_dir)
    if mode is None:
        raise ExportError(
            f"run directory {run_dir} does not exist; train one with: craft-train out_dir={run_dir} "
            f"(or give a Hugging Face model directory or a .gguf file)"
        )
    if not stat.S_ISDIR(mode):
        raise ExportError(
            f"{run_dir} is {describe_mode(mode)}, not a run directory; give a run directory written by "
            "craft-train, a Hugging Face model directory or a .gguf file"
        )
    for name in (rd.CONFIG, rd.SP_TOKENIZER, rd.CHAR_TOKENIZER, TOKENS, DATA_INFO, checkpoint):
        mode = file_mode(run_dir / name)
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ExportError(f"{run_dir / name} is {describe_mode(mode)}, not a regular file; restore the run's own")


def load_imported(path: Path, kind: str) -> LoadedRun:
    """An imported model (kind HF or GGUF) with its tokenizer and chat template; the bundled English
    text, in its tokens, stands in for a val split. ExportError (one line) if unusable."""
    from craft.export.source_tokenizer import read_gguf_tokenizer, read_hf_tokenizer

    path = Path(path)
    try:
        source = load_source(path, kind)
        tokens = read_hf_tokenizer(path) if kind == HF else read_gguf_tokenizer(source.gguf_reader)
        tokenizer = tokens.tokenizer()
    except ValueError as e:  # SourceError, TokenizerSourceError: one line each
        raise ExportError(str(e)) from None
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ExportError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only "
            f"{source.config.vocab_size}; they belong to different models"
        )
    text = PERPLEXITY_TEXT.read_text(encoding="utf-8")
    val = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(val) < len(text) // MAX_CHARS_PER_TOKEN:  # e.g. a normalizer that deletes every character
        raise ExportError(
            f"{path}: its tokenizer ({'tokenizer.json' if kind == HF else 'tokenizer.ggml.*'}) turns {len(text):,} "
            f"characters of English into {len(val)} tokens (real ones give one per 2-6 characters); it is damaged"
        )
    calibration = np.asarray(tokenizer.encode(calibration_text()), dtype=np.int64)
    return LoadedRun(
        path,
        source.config,
        source.model(),
        tokenizer,
        source.sha256,
        0,
        val,
        kind,
        source.architecture,
        tokens.chat_template,
        tokens.end_of_turn_ids,
        calibration,
    )


def saved_model_config(state: dict) -> ModelConfig | None:
    """The model config a checkpoint was trained with, fields it predates at their defaults."""
    saved = ModelConfig()
    try:
        apply_dict(saved, state["config"]["model"])
    except (ConfigError, KeyError, TypeError):
        return None
    return saved


def model_spec(cfg: ModelConfig) -> A.ModelSpec:
    return A.ModelSpec(
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_kv_head=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_dim=cfg.hidden_dim,
        context_length=cfg.context_length,
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings,
        qkv_bias=cfg.qkv_bias,
        arch=cfg.arch,
    )


def artifact_weights(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights, float32, named and laid out as craft.runtime.weights says (x @ W, fused qkv / w13;
    a recurrent model's blocks as W.recurrent_layer names them)."""
    cfg = model.cfg
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}  # PyTorch's names
    out = {W.EMBEDDING: sd["tok_embeddings.weight"], W.NORM: sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out[W.HEAD] = sd["output.weight"].T
    if cfg.arch == A.RECURRENT:
        for i in range(cfg.n_layer):
            p, n = f"layers.{i}.", W.recurrent_layer(i)
            out[n.recurrence_norm] = sd[p + "recurrence_norm.weight"]
            out[n.win] = sd[p + "recurrence.win.weight"].T
            out[n.decay] = sd[p + "recurrence.decay"]
            out[n.wo] = sd[p + "recurrence.wo.weight"].T
            out[n.ffn_norm] = sd[p + "ffn_norm.weight"]
            out[n.w13] = np.concatenate(
                [sd[p + "feed_forward.w1.weight"].T, sd[p + "feed_forward.w3.weight"].T], axis=1
            )
            out[n.w2] = sd[p + "feed_forward.w2.weight"].T
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    q_scale = np.float32(1.0 / math.sqrt(cfg.head_dim))  # folded into wq: the graph does not scale scores
    for i in range(cfg.n_layer):
        p, n = f"layers.{i}.", W.layer(i)
        out[n.attention_norm] = sd[p + "attention_norm.weight"]
        out[n.ffn_norm] = sd[p + "ffn_norm.weight"]
        wq, wk, wv = (sd[p + f"attention.{w}.weight"].T for w in ("wq", "wk", "wv"))  # (dim, out)
        out[n.wqkv] = np.concatenate([wq * q_scale, wk, wv], axis=1)
        if cfg.qkv_bias:
            out[n.wqkv_bias] = np.concatenate(
                [sd[p + "attention.wq.bias"] * q_scale, sd[p + "attention.wk.bias"], sd[p + "attention.wv.bias"]]
            )
        out[n.wo] = sd[p + "attention.wo.weight"].T
        out[n.w13] = np.concatenate([sd[p + "feed_forward.w1.weight"].T, sd[p + "feed_forward.w3.weight"].T], axis=1)
        out[n.w2] = sd[p + "feed_forward.w2.weight"].T
    out[W.ROPE_COS], out[W.ROPE_SIN] = model.rope_cos.numpy(), model.rope_sin.numpy()  # scaling, if any, is in them
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def build_model_proto(
    run: LoadedRun,
    quantize: str,
    opset: int = DEFAULT_OPSET,
    weights: dict[str, np.ndarray] | None = None,
    attention: str = A.ATTENTION_STANDARD,
):
    """(ModelProto with metadata, the scheme's ops) for one quantization; ops.errors has the
    quantizer's max error per weight. `weights`: artifact_weights(run.model), when the caller
    already has them; `attention`: how the graph keeps its KV-cache (craft.runtime.artifact.ATTENTIONS)."""
    import onnx

    spec = model_spec(run.config)
    weights = artifact_weights(run.model) if weights is None else weights
    prepared = Prepared(weights, spec)
    if W.SCHEMES[quantize].calibrated:  # GPTQ-rounded, an import rotated first (calibration.py)
        try:
            prepared = prepare(
                weights, spec, W.SCHEMES[quantize], run.calibration_tokens, rotate=run.source_kind != RUN
            )
        except CalibrationError as e:
            raise ExportError(str(e)) from None
    weights, spec = prepared.weights, prepared.spec
    ops = OPS[quantize](prepared.scales)
    ops.calibration = prepared.report
    if spec.arch == A.RECURRENT:  # no KV-cache: `attention` has nothing to say (export() refuses a non-standard one)
        proto = build_recurrent_decoder(spec, weights, ops, opset)
    else:
        proto = build_decoder(spec, weights, ops, opset, attention)
    meta = A.Artifact(
        spec=spec,
        tokenizer_kind=run.tokenizer.kind,
        tokenizer_data=run.tokenizer.to_bytes(),
        bos_id=run.tokenizer.bos_id,
        eos_id=run.tokenizer.eos_id,
        pad_id=run.tokenizer.pad_id,
        quantization=quantize,
        checkpoint_sha256=run.checkpoint_sha256,
        craft_version=__version__,
        chat_template=run.chat_template,
        end_of_turn_ids=run.end_of_turn_ids,
        source_kind=run.source_kind,
        attention=attention,
        format_version=A.oldest_version(spec),  # the graph builders write logits_to_keep: version 3 at least
    ).to_metadata()
    onnx.helper.set_model_props(proto, meta)
    what = f"step {run.step}" if run.source_kind == RUN else f"{run.architecture} from {run.source_kind}"
    name = os.fsencode(run.run_dir.name).decode("utf-8", "backslashreplace")  # protobuf strings are UTF-8
    proto.doc_string = f"Craft {__version__} export of {name} ({what}); metadata keys 'craft.*' describe it"
    return proto, ops


def random_run(cfg: ModelConfig, seed: int = 0) -> LoadedRun:
    """A run of the given shape with random weights and a char tokenizer spanning the whole
    vocabulary: what benchmarks and tests export to measure speed or compare backends without
    training first (the quality of its text is, of course, nil)."""
    import torch

    from craft.runtime.tokenizer import CharTokenizer

    torch.manual_seed(seed)
    chars = "".join(
        chr(0x100 + i) for i in range(cfg.vocab_size - CharTokenizer.CHAR_OFFSET)
    )  # stays below the surrogates
    return LoadedRun(
        Path(f"random-{cfg.dim}x{cfg.n_layer}"), cfg, build_model(cfg).eval(), CharTokenizer(chars), "0" * 64, 0
    )


def source_file_at(output: Path, source: Path) -> Path | None:
    """The file of the source that `output` is (symlinks and hard links included): the source file
    itself, or any file of the source directory but an earlier export (a .onnx, which re-exporting
    replaces by design); None where `output` is none of them."""
    try:
        candidates = [p for p in source.iterdir() if p.suffix != ".onnx"] if source.is_dir() else [source]
    except OSError:  # an unreadable source: the loader says so
        return None
    for candidate in candidates:
        try:
            if os.path.samefile(output, candidate):
                return candidate
        except OSError:  # output does not exist yet, or candidate vanished: not the same file
            continue
    return None


def check_output_path(output: Path, source: Path | None = None) -> None:
    """Refuse an output that is not a new path or a regular file (a rename would replace a device
    or FIFO with a file), that is a file of the `source` (the write would destroy the model being
    exported), or that cannot be written; sweep temp files of killed exports to it."""
    if source is not None and (same := source_file_at(output, Path(source))) is not None:
        raise ExportError(
            f"output {output} is {same}, a file of the source being exported: writing it would destroy "
            "the source; choose another -o"
        )
    parent = Path(os.path.abspath(output)).parent  # not resolve(): a symlink loop raises RuntimeError there
    if output.is_dir():
        raise ExportError(f"output {output} is a directory; give a file name, e.g. -o {output / 'model.onnx'}")
    try:
        mode = output.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:  # a path through a file, a symlink loop, a name too long: the path given is bad input
        bad_path = e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)
        raise (ExportError if bad_path else OutputWriteError)(
            f"cannot use output {output} ({e.strerror}); choose another -o"
        ) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise ExportError(
            f"output {output} exists and is not a regular file (a device, FIFO or socket); "
            "give a new path or a .onnx file"
        )
    if not parent.is_dir():
        raise ExportError(f"output directory {parent} does not exist; create it or choose another -o")
    try:  # probe by writing: permission bits do not tell root, read-only mounts or /proc apart
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{rd.temp_stem(output.name)}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputWriteError(f"cannot write {output} ({e.strerror}); choose another -o") from None
    if output.exists() and not os.access(output, os.W_OK):
        raise OutputWriteError(f"cannot write {output} (permission denied); choose another -o")
    rd.sweep_temp_files(parent, output.name)


def default_attention(config: ModelConfig, quantize: str) -> str:
    """`inplace` for a quantized transformer: its file needs ONNX Runtime's contrib ops anyway
    (MatMulNBits), and GroupQueryAttention over a cache written in place decodes 10-15% faster
    (README "In-place attention"). `standard` for float32 (standard ONNX ops only: any ONNX
    runtime), for a recurrent model (no KV-cache) and for heads GroupQueryAttention cannot take."""
    inplace = config.arch == A.LLAMA and quantize != W.NONE and heads_fit_inplace(config)
    return A.ATTENTION_INPLACE if inplace else A.ATTENTION_STANDARD


def heads_fit_inplace(config: ModelConfig) -> bool:
    """Whether ONNX Runtime's CPU GroupQueryAttention takes heads this wide."""
    return config.head_dim % A.INPLACE_HEAD_MULTIPLE == 0


def export(
    source: Path,
    output: Path,
    quantize: str = W.INT8,
    opset: int = DEFAULT_OPSET,
    checkpoint: str = rd.CHECKPOINT,
    log=print,
    kind: str | None = None,
    attention: str | None = None,
) -> dict:
    """Write a verified .onnx for the source - a run directory, a Hugging Face directory or a GGUF
    file (`kind` RUN / HF / GGUF; detected when None) - and return the report; `attention` is how
    the graph keeps its KV-cache (craft.runtime.artifact.ATTENTIONS; None: default_attention).
    ExportError / VerificationError on failure."""
    import onnx

    if quantize not in W.SCHEMES:
        raise ExportError(f"unknown --quantize '{quantize}'; expected one of: {', '.join(W.SCHEMES)}")
    if attention is not None and attention not in A.ATTENTIONS:
        raise ExportError(f"unknown --attention '{attention}'; expected one of: {', '.join(A.ATTENTIONS)}")
    if not checkpoint:  # Path(run_dir) / "" is the run directory itself
        raise ExportError(f"--checkpoint is empty; name a checkpoint file of the run (default {rd.CHECKPOINT})")
    output = Path(output)
    t0 = time.perf_counter()
    try:  # first: a source that is not there is named as such, not as an output under it (the default)
        kind = kind or detect_kind(source)
        if kind == RUN:
            check_run_files(Path(source), checkpoint)
    except SourceError as e:
        raise ExportError(str(e)) from None
    check_output_path(output, source)
    if kind != RUN and checkpoint != rd.CHECKPOINT:
        raise ExportError(
            f"--checkpoint picks a checkpoint of a run directory; {source} is a {kind} source - drop --checkpoint"
        )
    run = load_run(source, checkpoint) if kind == RUN else load_imported(source, kind)
    attention = attention or default_attention(run.config, quantize)
    if run.config.arch == A.RECURRENT and attention != A.ATTENTION_STANDARD:
        raise ExportError(
            f"--attention {attention} is how a transformer keeps its KV-cache; {source} is a recurrent model "
            f"(a fixed-size state, no cache) - drop --attention"
        )
    if attention == A.ATTENTION_INPLACE and not heads_fit_inplace(run.config):
        raise ExportError(
            f"--attention inplace needs a head width that is a multiple of {A.INPLACE_HEAD_MULTIPLE} (ONNX Runtime's "
            f"GroupQueryAttention); {source}'s is {run.config.head_dim} - use --attention standard"
        )
    check_graph_size(run, quantize, source)
    what = f"step {run.step}" if kind == RUN else f"{run.architecture}, {kind}"
    shown = printable(str(run.run_dir))  # a directory named with ESC [31m or a newline reached the terminal raw
    log(f"exporting {shown} ({what}, {run.model.num_parameters():,} parameters) as {quantize}, opset {opset}")
    note = pure_python_tokenizer_note(run.tokenizer)
    if note:
        log(note)
    weights = artifact_weights(run.model)
    proto, ops = build_model_proto(run, quantize, opset, weights, attention)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    with contextlib.ExitStack() as scratch:
        if quantize == W.NONE:
            fp32, fp32_size, quantized_bytes = data, len(data), None
        else:  # the float32 graph is the reference the quantized one is measured against
            reference = build_model_proto(run, W.NONE, opset, weights, attention)[0]
            if float32_bytes(run) > MAX_GRAPH_BYTES:  # past protobuf's 2 GB: its weights beside it, for ONNX Runtime
                fp32, fp32_size = scratch.enter_context(reference_files(reference, output))
            else:
                fp32 = reference.SerializeToString()
                fp32_size = len(fp32)
            del reference
            quantized_bytes = data
        report = verified(run, fp32, quantized_bytes, quantize, ops, log)
    report.update(
        {
            "quantization": quantize,
            "opset": opset,
            "attention": attention,
            "parameters": run.model.num_parameters(),
            "file_bytes": len(data),  # the graph's until the file with its report is written (below)
            "fp32_file_bytes": fp32_size,
            "size_ratio": len(data) / fp32_size,
            "max_weight_quant_error": float(  # np.max: a NaN shows (Python's max drops it after a number)
                np.max([*ops.errors.values(), ops.calibration.get("max_weight_change", 0.0)])
            ),
            "export_s": time.perf_counter() - t0,
            "checkpoint_sha256": run.checkpoint_sha256,
        }
    )
    if report["failures"]:
        raise VerificationError("; ".join(report["failures"]), report)
    size = len(data)
    del data, fp32, quantized_bytes  # a 135M model's are 700 MB
    props = {p.key: p.value for p in proto.metadata_props}
    stored = {k: v for k, v in report.items() if k not in ("failures", *WALL_CLOCK)}
    pad = 0  # The stored report gives the size of the file it is in, its own digits included: a claim one
    for _ in range(16):  # byte too long is filled with JSON whitespace, one too short claims more (2-5 passes)
        stored.update(file_bytes=size, size_ratio=size / fp32_size)
        onnx.helper.set_model_props(proto, {**props, A.META_EXPORT_REPORT: json.dumps(stored) + " " * pad})
        final = proto.SerializeToString()
        if len(final) == size:
            break
        pad, size = (pad + size - len(final), size) if len(final) < size else (pad, len(final))
    assert len(final) == size, "the report's size claim did not settle"
    check_output_path(output, source)  # again: minutes passed, something may have appeared there
    try:
        rd.atomic_write_bytes(output, final)
    except OSError as e:
        raise OutputWriteError(
            f"cannot write {output} ({e.strerror}); nothing was written - free space or choose another -o"
        ) from None
    report.update(file_bytes=stored["file_bytes"], size_ratio=stored["size_ratio"], export_s=time.perf_counter() - t0)
    return report
