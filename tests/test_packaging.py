"""Packaging: one distribution, folders mapped into craft.*, presets and device profiles shipped in
the wheel, editable install works, runtime is torch-free."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def source_copy(tmp_path: Path) -> Path:
    """The checkout's sources in a tmp dir: building writes build/ and *.egg-info next to setup.py."""
    dst = tmp_path / "src"
    shutil.copytree(
        REPO,
        dst,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "venv", "runs", "build", "*.egg-info", ".cache", "__pycache__", "*.onnx", "results"
        ),
    )
    return dst


def test_wheel_maps_folders_into_the_craft_namespace(tmp_path):
    src = source_copy(tmp_path)
    subprocess.run(
        PIP + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    wheel = zipfile.ZipFile(next(tmp_path.glob("craft-*.whl")))
    names = wheel.namelist()
    for expected in ("craft/__init__.py", "craft/model.py", "craft/export/graph.py", "craft/runtime/generator.py"):
        assert expected in names
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"runtime", "export", "tests", "benchmarks"}, top_level  # no generic names squatted
    metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra ==" not in line]
    assert sorted(line.split()[1].split(">")[0] for line in base) == [
        "click",
        "jinja2",
        "numpy",
        "onnxruntime",
        "sentencepiece",
        "tokenizers",
    ]
    assert "torch" in metadata and 'extra == "train"' in metadata
    scripts = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in (
        "craft-train = craft.entry:train",
        "craft-export = craft.entry:export",
        "craft-run = craft.entry:run",
    ):
        assert script in scripts


def build_wheel(tmp_path: Path) -> Path:
    src = source_copy(tmp_path)
    subprocess.run(
        PIP + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    shutil.rmtree(src)  # nothing of the checkout is left to be found by accident
    return next(tmp_path.glob("craft-*.whl"))


def install_in_fresh_venv(tmp_path: Path, *requirements: str) -> Path:
    """A venv without system site packages, `requirements` installed by this pip from the
    configured index / cache (one at a time: torch==2.13.0 first keeps pip off the CUDA build);
    returns its bin/ folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    for requirement in requirements:
        subprocess.run(
            PIP + ["--python", str(venv / "bin" / "python"), "install", requirement],
            check=True,
            timeout=600,
            cwd=tmp_path,
        )
    return venv / "bin"


def test_installed_wheel_has_presets_and_device_profiles(tmp_path, char_int8):
    """What a device installs (the wheel, runtime deps only, no torch): craft-run --estimate reads
    the device profiles and craft.config the presets from inside the installed package."""
    started = time.perf_counter()
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"craft/configs/tiny.yaml", "craft/configs/small.yaml", "craft/configs/devices/pi4.yaml"} <= set(names)
    bin_dir = install_in_fresh_venv(tmp_path, str(wheel))
    out = subprocess.run(
        [str(bin_dir / "craft-run"), str(char_int8), "--estimate"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for device in ("pi-zero-2w", "pi4", "pi5"):
        assert device in out.stdout, out.stdout
    code = "import craft.config as c; print(c.CONFIGS_DIR); print(*c.list_presets())"
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    folder, presets = out.stdout.splitlines()
    assert Path(folder).parts[-2:] == ("craft", "configs") and Path(folder).is_relative_to(tmp_path / "venv")
    assert set(presets.split()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    print(f"wheel -> fresh venv -> craft-run --estimate: {time.perf_counter() - started:.0f}s")


@pytest.mark.slow
def test_installed_wheel_with_training_extras_runs_craft_train(tmp_path):
    """The wheel with [train] in a fresh venv: craft-train --help, and a preset resolves. Slow:
    installing torch into a new venv takes about a minute on 2 cores."""
    started = time.perf_counter()
    wheel = build_wheel(tmp_path)
    bin_dir = install_in_fresh_venv(tmp_path, "torch==2.13.0", f"{wheel}[train]")
    out = subprocess.run(
        [str(bin_dir / "craft-train"), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0 and "--resume" in out.stdout and "Exit codes" in out.stdout, out.stderr
    code = "from craft.config import load_config; c = load_config('small'); print(c.model.dim, c.train.warmup_steps)"
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0 and out.stdout.split() == ["288", "200"], out.stderr
    print(f"wheel[train] -> fresh venv -> craft-train --help: {time.perf_counter() - started:.0f}s")


def test_editable_install_from_repo_root(tmp_path):
    """pip install -e . into a fresh venv (never this one: pip would uninstall its craft)."""
    src = source_copy(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "-e", "."],
        check=True,
        timeout=300,
        cwd=src,
    )
    # craft.runtime.artifact needs only the standard library, so the bare venv can import it
    out = subprocess.run(
        [str(python), "-c", "import craft.export, craft.runtime.artifact as a; print(a.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == src / "runtime" / "artifact.py"


def test_source_checkout_imports_without_install(tmp_path):
    """`python -m craft.train` / `torchrun -m craft.train` in the repo root put the checkout first on sys.path."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import craft.runtime.artifact as a, craft.export.graph as g; print(a.__file__, g.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "runtime" / "artifact.py"), str(REPO / "export" / "graph.py")]


def test_runtime_modules_import_with_torch_blocked():
    modules = [
        "craft",
        "craft.runtime",
        "craft.runtime.artifact",
        "craft.runtime.onnx_file",
        "craft.runtime.tokenizer",
        "craft.runtime.bpe_tokenizer",
        "craft.runtime.bpe_pretokenizer",
        "craft.runtime.chat_template",
        "craft.runtime.sampling",
        "craft.runtime.weights",
        "craft.runtime.ort_backend",
        "craft.runtime.numpy_backend",
        "craft.runtime.generator",
        "craft.runtime.cli",
        "craft.runtime.command",
    ]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; sys.modules['yaml'] = None\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_runtime_imports_only_its_own_package_from_craft():
    """A device installs craft/__init__.py and runtime/ alone (scripts/devices stages exactly that): a
    runtime module importing craft.entry made every emulated-ARM run fail with ModuleNotFoundError."""
    import ast

    outside = []
    for path in sorted((REPO / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            outside += [
                f"{path.name}: {n}" for n in names if n.startswith("craft.") and not n.startswith("craft.runtime")
            ]
    assert not outside, outside
