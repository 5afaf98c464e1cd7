"""The device check (scripts/devices/, issue 7).

test_staged_runtime_alone runs in the main suite (about a second): the check's staging - the
runtime alone, as a device installs it - and its driver (guest_run.py, which blocks torch and
onnx) generate the same greedy tokens as the in-tree runtime, on the host.

test_device_check runs the whole check (qemu-user, aarch64 + armv7; 1-2 minutes warm, under 5
cold) only when CRAFT_DEVICE_CHECK=1: CI calls scripts/devices/check.sh as a stage of its own.
It skips where the check skips (exit 77: qemu-user / debootstrap cannot be installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEVICES = REPO / "scripts" / "devices"


def load(name: str):
    """A script of scripts/devices/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"devices_{name}", DEVICES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_staged_runtime_alone(tmp_path, sp_int8):
    check = load("check")
    stage = check.stage_runtime(tmp_path)
    assert sorted(p.name for p in stage.iterdir()) == ["craft", "guest_run.py"]
    assert not (stage / "craft" / "export").exists() and (stage / "craft" / "runtime" / "generator.py").is_file()
    args = [str(sp_int8), check.PROMPT, "-t", "0", "-n", "12", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    staged = subprocess.run(
        [sys.executable, str(stage / "guest_run.py"), str(tmp_path / "report.json"), *args],
        cwd=stage,
        env={**env, "PYTHONPATH": str(stage)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert staged.returncode == 0, staged.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["craft_from"] == str(stage / "craft")
    assert report["forbidden_loaded"] == [] and report["forbidden_attempts"] == []
    assert report["packages"]["numpy"] and report["packages"]["onnxruntime"] and report["packages"]["sentencepiece"]
    in_tree = subprocess.run(
        [sys.executable, "-m", "craft.runtime.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert in_tree.returncode == 0, in_tree.stderr
    assert json.loads(staged.stdout)["token_ids"] == json.loads(in_tree.stdout)["token_ids"]


def test_guest_run_blocks_forbidden_imports():
    """The driver makes `import torch` / `import onnx` fail even where they are installed."""
    guest = load("guest_run")
    for name in ("torch", "onnx.helper", "google.protobuf", "craft.export.exporter", "craft.train"):
        with pytest.raises(ImportError, match=f"must not import {name}"):
            guest.Block().find_spec(name)
    for name in ("numpy", "onnxruntime", "sentencepiece", "click", "craft.runtime.cli"):
        assert guest.Block().find_spec(name) is None


@pytest.mark.skipif(
    os.environ.get("CRAFT_DEVICE_CHECK") != "1",
    reason="the emulated-ARM device check runs with CRAFT_DEVICE_CHECK=1 (CI runs scripts/devices/check.sh itself)",
)
def test_device_check():
    proc = subprocess.run(
        [str(DEVICES / "check.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HOST_PYTHON": sys.executable},
    )
    if proc.returncode == 77:
        pytest.skip(
            next(
                (line for line in proc.stdout.splitlines() if line.startswith("SKIP")), "device check skipped (exit 77)"
            )
        )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
