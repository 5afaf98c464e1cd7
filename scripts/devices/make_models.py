#!/usr/bin/env python3
"""Build the device check's two int8 models on the host (needs the [train] extras: torch, onnx).

usage: make_models.py OUT_DIR [DATA_FILE]

  tiny.int8.onnx   a very small model trained for a few seconds (dim 64, 2 layers, 4 heads,
                   2 kv heads, context 64, sentencepiece vocabulary 512) with craft-train and
                   exported with craft-export --quantize int8: the real pipeline, and a
                   sentencepiece model inside the file, so the device's sentencepiece loads it.
                   DATA_FILE defaults to the bundled corpus.
  tiny_q4_1.onnx   the tiny run exported with --quantize q4_1 (4-bit MatMulNBits with zero points,
                   float block offsets): gated like tiny.
  tiny_rotated.int8.onnx  the tiny run exported int8 as an imported model is: its residual stream
                   rotated, a head rotation, w2's input turned at run time (ffn_rotation, format
                   version 4), GPTQ: gated like tiny.
  recurrent.int8.onnx  the same with model.arch=recurrent (craft/recurrent.py: state I/O, an
                   ONNX Scan): gated like tiny, token for token against x86_64.
  small.int8.onnx  the small preset (configs/small.yaml) at its 15M-class size (vocab 32000)
                   with random weights, built like the benchmarks' model (no training): the
                   memory test.
  models.json      what the check reports about them: sizes, opset, IR version, operators.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TINY_OVERRIDES = [
    "tokenizer.kind=sentencepiece",
    "tokenizer.vocab_size=512",
    "model.dim=64",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.context_length=64",
    "train.max_steps=150",
    "train.warmup_steps=10",
    "train.batch_size=16",
    "train.threads=1",
]
SMALL_VOCAB = 32000  # the 15M class


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"make_models: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return proc.stdout


def build_tiny(out: Path, data: str | None, name: str = "tiny", extra: tuple[str, ...] = ()) -> dict:
    t0 = time.perf_counter()
    run_dir = out / f"{name}-run"
    train = [sys.executable, "-m", "craft.train", f"out_dir={run_dir}", *TINY_OVERRIDES, *extra, "--overwrite"]
    if data:
        train.insert(3, f"data.path={data}")
    log = run(train)
    t1 = time.perf_counter()
    path = out / f"{name}.int8.onnx"
    export_log = run([sys.executable, "-m", "craft.export.cli", str(run_dir), "--quantize", "int8", "-o", str(path)])
    done = [line for line in log.splitlines() if line.startswith("done:")]
    return {
        "path": str(path),
        "train_s": round(t1 - t0, 1),
        "export_s": round(time.perf_counter() - t1, 1),
        "data": data or "bundled corpus",
        "train": done[-1] if done else "",
        "export": [line.strip() for line in export_log.splitlines() if line.strip().startswith(("quality", "size"))],
    }


def export_again(out: Path, name: str, quantize: str) -> dict:
    """The run build_tiny trained for `name`, exported as `quantize` too."""
    t0 = time.perf_counter()
    path = out / f"{name}_{quantize}.onnx"
    run([sys.executable, "-m", "craft.export.cli", str(out / f"{name}-run"), "--quantize", quantize, "-o", str(path)])
    return {"path": str(path), "export_s": round(time.perf_counter() - t0, 1)}


def write_int8(run, path: Path) -> Path:
    """The run's int8 graph (craft-export's, unverified) written to `path` through a temporary file."""
    from craft.export.exporter import build_model_proto

    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(build_model_proto(run, "int8")[0].SerializeToString())
    tmp.replace(path)
    return path


def export_as_import(out: Path, name: str) -> dict:
    """The run build_tiny trained for `name`, exported int8 the way craft-export exports an import."""
    import dataclasses

    from craft.export.exporter import load_run

    t0 = time.perf_counter()
    run = dataclasses.replace(load_run(out / f"{name}-run"), source_kind="hf")  # rotated as imports are
    path = write_int8(run, out / f"{name}_rotated.int8.onnx")
    return {"path": str(path), "export_s": round(time.perf_counter() - t0, 1)}


def build_small(out: Path) -> dict:
    """The small preset (configs/small.yaml) at its 15M-class size, vocab 32000, random weights."""
    from craft.config import load_config
    from craft.export.exporter import random_run

    t0 = time.perf_counter()
    cfg = load_config("small").model
    cfg.vocab_size = SMALL_VOCAB
    run = random_run(cfg)
    path = write_int8(run, out / "small.int8.onnx")
    return {"path": str(path), "build_s": round(time.perf_counter() - t0, 1), "parameters": run.model.num_parameters()}


def describe(path: str) -> dict:
    import onnx

    m = onnx.load(path, load_external_data=False)
    return {
        "bytes": Path(path).stat().st_size,
        "ir_version": m.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "ops": sorted({(n.domain + "::" if n.domain else "") + n.op_type for n in m.graph.node}),
    }


def main() -> None:
    out = Path(sys.argv[1])
    data = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    out.mkdir(parents=True, exist_ok=True)
    import onnx
    import sentencepiece
    import torch

    info = {
        "tiny": build_tiny(out, data),
        "recurrent": build_tiny(out, data, "recurrent", ("model.arch=recurrent",)),
        "tiny_q4_1": export_again(out, "tiny", "q4_1"),
        "tiny_rotated": export_as_import(out, "tiny"),
        "small": build_small(out),
        "host": {"torch": torch.__version__, "onnx": onnx.__version__, "sentencepiece": sentencepiece.__version__},
    }
    for name in ("tiny", "recurrent", "tiny_q4_1", "tiny_rotated", "small"):
        info[name].update(describe(info[name]["path"]))
    (out / "models.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
