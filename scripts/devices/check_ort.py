#!/usr/bin/env python3
"""Guest-side onnxruntime smoke test (runs under qemu; needs numpy + onnxruntime only).

usage: check_ort.py MODELS_DIR
Prints one "RESULT key=value" line per check and a final "SUMMARY" line:
  import time, ORT version, per-model status (ok / mismatch / error),
  and the highest default-domain opset whose model loads without an
  "under development" warning (max_opset) or at all (max_opset_loads).
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402

t1 = time.perf_counter()
import onnxruntime as ort  # noqa: E402

t2 = time.perf_counter()
print(f"RESULT numpy={np.__version__} import_numpy_s={t1 - t0:.2f}", flush=True)
print(f"RESULT ort={ort.__version__} import_ort_s={t2 - t1:.2f}", flush=True)


def _session(path: str, optimize: bool = True):
    """Create a session, capturing native stderr (ORT logs warnings there)."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            err = None
        except Exception as exc:  # noqa: BLE001
            sess, err = None, exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        log = tmp.read().decode(errors="replace")
    return sess, err, log


def _diffs(sess, feeds, data, prefix):
    outs = sess.run(None, feeds)
    res = {}
    for meta, got in zip(sess.get_outputs(), outs):
        key = f"{prefix}_{meta.name}"
        if key not in data.files:
            continue
        ref = data[key]
        if ref.dtype.kind in "iu":
            d = float(np.abs(got.astype(np.int64) - ref.astype(np.int64)).max())
        else:
            d = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        res[meta.name] = d
    return res


def _run(path: str) -> str:
    """'ok'/'mismatch'/'error': unoptimized guest graph vs unoptimized host graph
    (ref_*), tolerance 1e-4 relative (exact for ints); then, for information,
    default-optimized guest vs default-optimized host (out_*)."""
    data = np.load(path[:-5] + ".npz")
    feeds = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
    parts = []
    worst = 0.0
    for optimize, prefix in ((False, "ref"), (True, "out")):
        sess, err, _log = _session(path, optimize)
        if sess is None:
            msg = str(err).splitlines()[0][-160:] if str(err) else type(err).__name__
            return f"error ({msg})"
        try:
            diffs = _diffs(sess, feeds, data, prefix)
        except Exception as exc:  # noqa: BLE001
            return f"error ({str(exc).splitlines()[0][-160:]})"
        if not optimize:
            worst = max(diffs.values())
        parts.append(
            ("noopt" if not optimize else "opt") + "[" + " ".join(f"{k}:{v:.1e}" for k, v in diffs.items()) + "]"
        )
    tag = "ok" if worst < 1e-4 else "mismatch"
    return f"{tag} ({' '.join(parts)})"


def main() -> int:
    mdir = sys.argv[1]
    results = {}
    for name in ("core", "nbits8", "nbits4"):
        t = time.perf_counter()
        results[name] = _run(os.path.join(mdir, f"{name}.onnx"))
        print(f"RESULT model={name} {results[name]} ({time.perf_counter() - t:.2f}s)", flush=True)
    max_clean = max_any = None
    for path in sorted(glob.glob(os.path.join(mdir, "opset_*.onnx"))):
        op = int(os.path.basename(path)[6:8])
        sess, _err, log = _session(path)
        if sess is None:
            continue
        max_any = op
        if "under development" not in log:
            max_clean = op
    print(f"RESULT max_opset={max_clean} max_opset_loads={max_any}", flush=True)
    print(
        f"SUMMARY ort={ort.__version__} import_s={t2 - t1:.2f} "
        + " ".join(f"{k}={v.split()[0]}" for k, v in results.items())
        + f" max_opset={max_clean}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
