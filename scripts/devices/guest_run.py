"""craft-run with proof of what it ran on: the device check's driver (guest and host alike).

usage: python3 guest_run.py REPORT.json [craft-run arguments...]

Runs craft.runtime.cli (craft-run) in this process with the given arguments - its stdout is
craft-run's own - and then writes REPORT.json: the machine, the versions of Python and of every
package the runtime loaded, where `craft` was imported from, the peak RSS, craft-run's exit code
and the modules that must never load on a device. Those (torch, onnx, protobuf, the training and
export code) are blocked outright: importing one fails, as it would on a device without them,
even on a host that has them installed.

Standard library only until craft-run starts; works on Python 3.8+.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import platform
import sys
import time

FORBIDDEN = (
    "torch",
    "onnx",
    "onnxscript",
    "google.protobuf",
    "yaml",
    "craft.export",
    "craft.model",
    "craft.train",
    "craft.data",
    "craft.config",
)


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


class Block(importlib.abc.MetaPathFinder):
    attempts: list = []

    def find_spec(self, name, path=None, target=None):
        if forbidden(name):
            Block.attempts.append(name)
            raise ImportError(f"device check: the runtime must not import {name}")
        return None


def version(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is None:
        return None
    try:
        from importlib.metadata import version as dist_version

        return dist_version(name)
    except Exception:  # noqa: BLE001 - a Debian package without metadata, say
        return str(getattr(module, "__version__", "?"))


def peak_rss_mb() -> float | None:
    try:
        from craft.runtime.generator import peak_rss_mb as runtime_peak_rss_mb
    except ImportError:  # the runtime failed to import: that is reported separately
        return None
    return runtime_peak_rss_mb()


def main() -> int:
    report_path, args = sys.argv[1], sys.argv[2:]
    sys.meta_path.insert(0, Block())
    t0 = time.perf_counter()
    code = 0
    sys.argv = ["craft-run", *args]
    try:
        from craft.runtime.cli import main as craft_run

        craft_run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    import craft

    report = {
        "exit_code": code,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "byteorder": sys.byteorder,
        "pointer_bits": 64 if sys.maxsize > 2**32 else 32,
        "packages": {n: version(n) for n in ("numpy", "onnxruntime", "sentencepiece", "click")},
        "craft_from": os.path.dirname(os.path.abspath(craft.__file__)),
        "forbidden_loaded": sorted(m for m in sys.modules if forbidden(m)),
        "forbidden_attempts": sorted(set(Block.attempts)),
        "vmhwm_mb": peak_rss_mb(),  # craft.runtime's own measure (VmHWM on Linux)
        "wall_s": time.perf_counter() - t0,
    }
    if "onnxruntime" in sys.modules:
        report["ort_providers"] = sys.modules["onnxruntime"].get_available_providers()
    with open(report_path, "w") as f:
        json.dump(report, f)
    if report["forbidden_loaded"] or report["forbidden_attempts"]:
        print(
            f"device check: forbidden imports {report['forbidden_loaded'] or report['forbidden_attempts']}",
            file=sys.stderr,
        )
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
