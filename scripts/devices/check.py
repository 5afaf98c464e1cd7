#!/usr/bin/env python3
"""The device check (issue 7): the same int8 .onnx on emulated 64-bit and 32-bit ARM.

usage: scripts/devices/check.sh          (or `make devices`; this file is its body)
       scripts/devices/check.sh --ort-sweep [VERSION...]
           only the tiny model with the ort backend on aarch64 (cortex-a53), once per onnxruntime
           version (default: the newest patch of every minor from 1.15 on): which ORT versions
           run the artifact under emulation, token for token

1. prepare   scripts/devices/prepare.sh arm64 and armhf, concurrently: Debian bookworm
             userlands run by qemu-user without chroot (cached under .cache/devices/).
2. models    on the host (needs the [train] extras): a tiny sentencepiece model trained in
             seconds and exported int8 by craft-train / craft-export, and the small preset at
             its 15M-class shape with random weights, int8 (cached by a hash of the sources).
3. stage     craft/__init__.py + runtime/*.py as craft/runtime/ in a folder of their own: the
             runtime alone, as a device installs it; no torch, onnx or training code anywhere
             on the guest's path (guest_run.py also blocks those imports and reports them).
4. runs      craft-run -t 0 --json (greedy) through guest_run.py, each under a memory cap:
               x86_64  host python      ort, numpy   all five models     the reference
               aarch64 qemu cortex-a53  ort, numpy   all five models     (Pi Zero 2 W / Pi 3)
                       qemu cortex-a72  ort          tiny           (Pi 4)
                       qemu cortex-a76  ort          tiny           (Pi 5: int8 dot-product kernels)
                       cortex-a53, every ORT in CRAFT_DEVICE_ORT_VERSIONS   tiny
               armv7l  qemu cortex-a7   numpy        all five models     (32-bit Pi OS: no ORT)
             (all five: tiny, recurrent, tiny_q4_1, tiny_rotated, small)
5. gates     tiny, recurrent, tiny_q4_1 (the tiny run as q4_1) and tiny_rotated (the tiny run
             int8 as an import: rotations, w2's input turned at run time): token ids and text
             identical to the x86_64 run of the same backend, on every machine (or parting at a
             NEAR_TIE, the two tokens' logits within 0.03 on x86_64); every run exits 0
             with only the runtime's packages loaded; small: every run generates all its tokens
             under the cap, and its x86_64 numpy peak RSS fits the Pi
             Zero 2 W budget (configs/devices/pi-zero-2w.yaml: memory_mb - os_reserved_mb).

Exit 0 pass, 1 fail, 77 skipped (qemu-user / debootstrap cannot be installed, or not root).

Environment:
  CRAFT_DEVICE_ARCHES        "arm64 armhf" (default)
  CRAFT_DEVICE_ORT_VERSIONS  extra onnxruntime versions for the tiny model on aarch64
                             (default: the minimum the README states, MIN_ORT below)
  CRAFT_DEVICE_CAP_MB        memory cap per run (default: the Pi Zero 2 W budget, 362)
  CRAFT_DEVICE_JOBS          runs at a time (default: the number of CPUs)
  CRAFT_DEVICES_CACHE        cache root (default REPO/.cache/devices)
  HOST_PYTHON                python with craft[train] installed (default: this python)
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("CRAFT_DEVICES_CACHE") or REPO / ".cache" / "devices")
EXIT_OK, EXIT_FAIL, EXIT_SKIP = 0, 1, 77

MIN_ORT = "1.23.2"  # setup.py's floor: the oldest onnxruntime whose MatMulNBits runs 8 bits on aarch64
PROMPT = "ROMEO: Wherefore art thou \u2014 "  # the em dash is not in a 512-piece vocabulary: byte fallback
GATED = ("tiny", "recurrent", "tiny_q4_1", "tiny_rotated")  # greedy output must match x86_64 token for token
# ...except where it parts at a near tie: the two tokens' logits this close on x86_64 (the same backend).
# The tiny models are trained on the host, so each CPU's torch gives other weights, and now and then
# a position whose top two lie 1e-3 apart (tiny_rotated on an AVX-512 + AMX Xeon: 2.7305 vs 2.7295,
# which emulated aarch64 ONNX Runtime ordered the other way; one int8 activation rounding that flips
# moves these models' logits by up to 0.016). A wrong kernel moves logits by far more.
NEAR_TIE = 0.03
TINY_TOKENS, SMALL_TOKENS = 40, 16  # the tiny model's context is 64 (prompt: 21 tokens)
FORBIDDEN_NOTE = "torch, onnx, protobuf, yaml, craft training/export code"
ARCH_MACHINE = {"x86_64": "x86_64", "arm64": "aarch64", "armhf": "armv7l"}
PROFILE = REPO / "configs" / "devices" / "pi-zero-2w.yaml"


def first_difference(reference: list[int], tokens: list[int]) -> int:
    """The first token where `tokens` part from `reference` (the shorter one's length if neither does)."""
    return next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))


def tie_gap(model: str, backend: str, reference: list[int], tokens: list[int], k: int) -> float | None:
    """The logit gap of the two tokens at k, where `tokens` part from `reference`, on this machine's
    `backend` (the model run on PROMPT + reference[:k]); None where one list merely ends at k."""
    if k >= min(len(reference), len(tokens)):
        return None
    import numpy as np

    from craft.runtime.generator import Generator

    g = Generator(model, backend=backend)
    ids = np.array([g.encode_prompt(PROMPT, TINY_TOKENS) + list(reference[:k])])  # (1, T)
    g.backend.reset(1, ids.shape[1])
    logits = g.backend.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])[0, -1]
    return abs(float(logits[reference[k]] - logits[tokens[k]]))


def say(msg: str = "") -> None:
    print(msg, flush=True)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------- memory cap
class MemoryCap:
    """Runs a command under a memory limit, by the best mechanism this machine allows:

    cgroup2 / cgroup1  memory.max / memory.limit_in_bytes on a cgroup of its own per run: RSS
                       plus page cache, like the RAM of a board; exceeding it is an OOM kill.
                       The peak is memory.peak / memory.max_usage_in_bytes.
    rlimit             RLIMIT_AS (ulimit -v): address space, stricter than RAM; impossible for
                       qemu-arm (it reserves the whole 4 GiB guest space), which then runs uncapped.
    none               no cap: peak RSS measured only.
    """

    def __init__(self, limit_mb: int):
        self.limit = limit_mb * 2**20
        self.limit_mb = limit_mb
        self.kind, self.base, self.why = "none", None, ""
        self._n = 0
        self._lock = threading.Lock()
        for probe in (self._probe_v2, self._probe_v1):
            try:
                if probe():
                    return
            except OSError as e:
                self.why += f"{probe.__name__[7:]}: {e.strerror or e}; "
        if shutil.which("sh"):
            self.kind = "rlimit"

    def _own_cgroup(self, controller: str | None) -> str | None:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            num, ctrls, path = line.split(":", 2)
            if (controller is None and num == "0") or (controller and controller in ctrls.split(",")):
                return path
        return None

    def _try_group(self, base: Path, limit_file: str) -> bool:
        test = base / f"craft-devices-probe-{os.getpid()}"
        test.mkdir()
        try:
            if not (test / limit_file).exists():
                self.why += f"no {limit_file} under {base}; "
                return False
            (test / limit_file).write_text(str(self.limit))
            return True
        finally:
            test.rmdir()

    def _probe_v2(self) -> bool:
        root = Path("/sys/fs/cgroup")
        path = self._own_cgroup(None)
        if path is None or not (root / "cgroup.controllers").exists():
            return False
        base = root / path.lstrip("/")
        if self._try_group(base, "memory.max"):
            self.kind, self.base = "cgroup2", base
            return True
        return False

    def _probe_v1(self) -> bool:
        path = self._own_cgroup("memory")
        root = Path("/sys/fs/cgroup/memory")
        if path is None or not root.is_dir():
            return False
        base = root / path.lstrip("/")
        if self._try_group(base, "memory.limit_in_bytes"):
            self.kind, self.base = "cgroup1", base
            return True
        return False

    def describe(self) -> str:
        mb = f"{self.limit_mb} MiB"
        if self.kind == "cgroup2":
            return f"cgroup v2 memory.max = {mb} per run (RSS + page cache, swap off), peak from memory.peak"
        if self.kind == "cgroup1":
            return (
                f"cgroup v1 memory.limit_in_bytes = {mb} per run (RSS + page cache, swap off), "
                "peak from memory.max_usage_in_bytes"
            )
        if self.kind == "rlimit":
            return (
                f"RLIMIT_AS (ulimit -v) = {mb} per run: address space, not RAM; "
                f"no cgroup ({self.why.strip('; ') or 'none writable'})"
            )
        return f"none (no writable cgroup, no sh): peak RSS measured only, not enforced ({self.why.strip('; ')})"

    def run(self, cmd: list[str], arch: str, **kw) -> tuple[subprocess.CompletedProcess, dict]:
        """(completed process, {"capped": how, "peak_mb": cgroup peak or None, "oom": bool})."""
        info = {"capped": self.kind, "peak_mb": None, "oom": False}
        if self.kind in ("cgroup1", "cgroup2"):
            with self._lock:
                self._n += 1
                group = self.base / f"craft-devices-{os.getpid()}-{self._n}"
            group.mkdir()
            try:
                if self.kind == "cgroup1":
                    (group / "memory.limit_in_bytes").write_text(str(self.limit))
                    for extra in ("memory.memsw.limit_in_bytes",):  # no swapping past the cap either
                        try:
                            (group / extra).write_text(str(self.limit))
                        except OSError:
                            pass
                else:
                    (group / "memory.max").write_text(str(self.limit))
                    try:
                        (group / "memory.swap.max").write_text("0")
                    except OSError:
                        pass
                wrapped = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *cmd]
                proc = subprocess.run(wrapped, **kw)
                peak_file = "memory.max_usage_in_bytes" if self.kind == "cgroup1" else "memory.peak"
                try:
                    info["peak_mb"] = int((group / peak_file).read_text()) / 2**20
                except (OSError, ValueError):
                    pass
                events = group / ("memory.oom_control" if self.kind == "cgroup1" else "memory.events")
                try:
                    m = re.search(r"oom_kill (\d+)", events.read_text())
                    info["oom"] = bool(m and int(m.group(1)))
                except OSError:
                    pass
                return proc, info
            finally:
                for _ in range(50):
                    try:
                        group.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)
        if self.kind == "rlimit" and arch != "armhf":
            wrapped = ["sh", "-c", f'ulimit -v {self.limit // 1024} && exec "$@"', "sh", *cmd]
            return subprocess.run(wrapped, **kw), info
        info["capped"] = "none" if self.kind != "rlimit" else "none (qemu-arm reserves 4 GiB of address space)"
        return subprocess.run(cmd, **kw), info


# ---------------------------------------------------------------------------------------- stages
def prepare(arches: list[str], host_python: str, timings: dict) -> dict:
    """prepare.sh for every arch at once; {arch: rc}. Logs in CACHE/logs/."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOST_PYTHON": host_python, "PREPARE_SMOKE": "0"}
    procs = {}
    t0 = time.perf_counter()
    for arch in arches:
        log = open(logs / f"prepare-{arch}.log", "w")
        procs[arch] = (
            subprocess.Popen([str(HERE / "prepare.sh"), arch], stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
        )
    rcs = {}
    for arch, (p, log) in procs.items():
        rcs[arch] = p.wait()
        log.close()
        text = (logs / f"prepare-{arch}.log").read_text(errors="replace")
        built = re.findall(r"stage (\w+): [\d.]+s \((built|downloaded[^)]*|unpacked|installed[^)]*)", text)
        timings[f"prepare {arch}"] = (
            time.perf_counter() - t0,
            ", ".join(f"{s} {w.split()[0]}" for s, w in built) or "cached",
        )
    return rcs


def data_file() -> str | None:
    for cand in (
        REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
        Path("/work/shared/data/tinyshakespeare.txt"),
    ):
        if cand.is_file():
            return str(cand)
    return None


def models(host_python: str, timings: dict) -> dict:
    """tiny.int8.onnx + small.int8.onnx, rebuilt when the sources that make them change."""
    data = data_file()
    h = hashlib.sha256()
    for folder in ("craft", "export", "runtime"):
        for f in sorted((REPO / folder).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    for f in sorted((REPO / "configs").glob("*.yaml")) + [HERE / "make_models.py"]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(f"{data}:{Path(data).stat().st_size if data else 0}".encode())
    out = CACHE / "models" / h.hexdigest()[:16]
    t0 = time.perf_counter()
    if (out / "models.json").is_file():
        timings["models"] = (time.perf_counter() - t0, f"cached ({out.name})")
        return json.loads((out / "models.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    for old in (CACHE / "models").glob("*/models.json"):  # keep the cache to one set
        shutil.rmtree(old.parent, ignore_errors=True)
    proc = subprocess.run(
        [host_python, str(HERE / "make_models.py"), str(out), data or ""],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode:
        raise CheckError(f"building the models on the host failed:\n{proc.stdout[-3000:]}")
    timings["models"] = (time.perf_counter() - t0, "built: craft-train + craft-export (tiny), random weights (small)")
    return json.loads((out / "models.json").read_text())


def stage_runtime(work: Path) -> Path:
    """craft/__init__.py + runtime/*.py as craft/runtime/: the device's install, nothing more."""
    stage = work / "stage"
    (stage / "craft" / "runtime").mkdir(parents=True)
    shutil.copy2(REPO / "craft" / "__init__.py", stage / "craft" / "__init__.py")
    for f in (REPO / "runtime").glob("*.py"):
        shutil.copy2(f, stage / "craft" / "runtime" / f.name)
    shutil.copy2(HERE / "guest_run.py", stage / "guest_run.py")
    return stage


def ort_pythonpath(version: str, host_python: str) -> str:
    """ORT site:numpy site for one aarch64 onnxruntime version (lib.sh, cached)."""
    proc = subprocess.run(
        ["bash", "-c", f'. "{HERE}/lib.sh" && devices_ort_pythonpath "$0" "$1"', str(CACHE / "arm64"), version],
        env={**os.environ, "HOST_PY": host_python},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode:
        raise CheckError(f"fetching onnxruntime {version} for aarch64 failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------- runs
class CheckError(RuntimeError):
    pass


@dataclass
class Run:
    arch: str  # x86_64 | arm64 | armhf
    cpu: str
    backend: str
    model: str  # tiny | recurrent | tiny_q4_1 | tiny_rotated | small
    ort: str = ""  # onnxruntime version, "" = the prepared one
    pythonpath: str = ""
    result: dict = field(default_factory=dict)
    near_tie: bool = False  # its greedy output parts from x86_64's where two tokens tie within NEAR_TIE

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.cpu}/{self.backend}/{self.model}" + (f"/ort{self.ort}" if self.ort else "")


def execute(run: Run, cap: MemoryCap, stage: Path, work: Path, models_info: dict, host_python: str) -> Run:
    model = models_info[run.model]["path"]
    n = TINY_TOKENS if run.model in GATED else SMALL_TOKENS
    report = work / f"{run.name.replace('/', '_')}.json"
    craft_run = [model, PROMPT, "-t", "0", "-n", str(n), "--json", "--backend", run.backend]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep the staged tree as copied
    if run.arch == "x86_64":
        cmd = [host_python, str(stage / "guest_run.py"), str(report), *craft_run]
        env["PYTHONPATH"] = str(stage)
    else:
        cmd = [str(HERE / "run.sh"), run.arch, "guest_run.py", str(report), *craft_run]
        env["DEVICE_CPU"] = run.cpu
        env["DEVICE_PYTHONPATH"] = ":".join(p for p in (str(stage), run.pythonpath) if p)
    t0 = time.perf_counter()
    try:
        proc, info = cap.run(
            cmd, run.arch, cwd=stage, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        run.result = {"ok": False, "error": "timed out after 600 s", "wall_s": time.perf_counter() - t0}
        return run
    r = {"wall_s": time.perf_counter() - t0, "rc": proc.returncode, **info}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(tokens=out["token_ids"], text=out["text"], stats=out["stats"])
    except (json.JSONDecodeError, IndexError, KeyError):
        r["error"] = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")[-800:]
    try:
        r["device"] = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        r.setdefault("error", (proc.stderr.strip() or f"no report, exit {proc.returncode}")[-800:])
    if proc.returncode and "error" not in r:
        r["error"] = (proc.stderr.strip() or f"exit {proc.returncode}")[-800:]
    if info.get("oom"):
        r["error"] = f"OOM-killed under the {cap.limit_mb} MiB cap"
    r["ok"] = "error" not in r
    run.result = r
    return run


def all_ort_versions(host_python: str) -> list[str]:
    """The newest patch of every onnxruntime minor >= 1.15 that pip lists (1.15: the first cp311 wheels)."""
    out = subprocess.run(
        [host_python, "-m", "pip", "index", "versions", "onnxruntime"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ).stdout
    m = re.search(r"Available versions: (.*)", out)
    if not m:
        raise CheckError(
            "`pip index versions onnxruntime` listed nothing; pass the versions: --ort-sweep 1.15.1 1.32.0 ..."
        )
    newest: dict = {}
    for v in m.group(1).split(", "):
        parts = v.strip().split(".")
        numeric = len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts)
        if numeric and (int(parts[0]), int(parts[1])) >= (1, 15):
            key = (int(parts[0]), int(parts[1]))
            newest[key] = max(newest.get(key, (0, 0, 0)), tuple(map(int, parts)))
    return [".".join(map(str, newest[k])) for k in sorted(newest)]


def plan(arches: list[str], ort_versions: list[str], sweep: bool = False) -> list[Run]:
    if sweep:
        return [Run("x86_64", "host", "ort", "tiny")] + [
            Run("arm64", "cortex-a53", "ort", "tiny", ort=v) for v in ort_versions
        ]
    models = ("tiny", "recurrent", "tiny_q4_1", "tiny_rotated", "small")
    runs = [Run("x86_64", "host", b, m) for m in models for b in ("ort", "numpy")]
    if "arm64" in arches:
        runs += [Run("arm64", "cortex-a53", b, m) for m in models for b in ("ort", "numpy")]
        runs += [Run("arm64", cpu, "ort", "tiny") for cpu in ("cortex-a72", "cortex-a76")]
        runs += [Run("arm64", "cortex-a53", "ort", "tiny", ort=v) for v in ort_versions]
    if "armhf" in arches:
        runs += [Run("armhf", "cortex-a7", "numpy", m) for m in models]
    # slowest first, so that the pool finishes together
    return sorted(runs, key=lambda r: (r.model != "small", r.arch == "x86_64"))


def profile_budget() -> tuple[int, str]:
    """(memory_mb - os_reserved_mb, description) of the Pi Zero 2 W profile."""
    values = {}
    try:
        for line in PROFILE.read_text().splitlines():
            key, _, value = line.split("#", 1)[0].partition(":")
            values[key.strip()] = value.strip()
        mem, reserved = float(values["memory_mb"]), float(values["os_reserved_mb"])
        return int(mem - reserved), f"{PROFILE.relative_to(REPO)}: {mem:.0f} MB - {reserved:.0f} MB OS reserve"
    except (OSError, KeyError, ValueError):
        return 362, "Pi Zero 2 W: 512 MB - 150 MB OS reserve"


def predicted(host_python: str, model: str) -> str:
    """craft-run --estimate's row for the Pi Zero 2 W, if this runtime has it."""
    proc = subprocess.run(
        [host_python, "-m", "craft.runtime.cli", model, "--estimate"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = (
        {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()} if proc.returncode == 0 else {}
    )
    row = rows.get("pi-zero-2w", "")
    m = re.search(r"(\d+)MB\s+\d+MB\s+(?:yes|NO)\b", row)  # peak RSS: before `available` and `fits`
    return f"{m.group(1)} MB" if m else "n/a"


# ---------------------------------------------------------------------------------------- report
def main() -> int:
    t_start = time.perf_counter()
    sweep = sys.argv[1:2] == ["--ort-sweep"]
    arches = ["arm64"] if sweep else os.environ.get("CRAFT_DEVICE_ARCHES", "arm64 armhf").split()
    host_python = os.environ.get("HOST_PYTHON") or sys.executable
    try:
        ort_versions = (
            (sys.argv[2:] or all_ort_versions(host_python))
            if sweep
            else os.environ.get("CRAFT_DEVICE_ORT_VERSIONS", MIN_ORT).split()
        )
    except CheckError as e:
        say(f"FAIL: {e}")
        return EXIT_FAIL
    budget_mb, budget_src = profile_budget()
    cap = MemoryCap(int(os.environ.get("CRAFT_DEVICE_CAP_MB") or budget_mb))
    jobs = int(os.environ.get("CRAFT_DEVICE_JOBS") or os.cpu_count() or 2)
    timings: dict = {}
    say(
        f"Craft device check: {', '.join(ARCH_MACHINE[a] for a in arches)} under qemu-user vs x86_64 "
        f"(host {platform.machine()}, {os.cpu_count()} CPUs)"
    )

    # 1. prepare
    rcs = prepare(arches, host_python, timings)
    for arch, rc in rcs.items():
        log = (CACHE / "logs" / f"prepare-{arch}.log").read_text(errors="replace")
        if rc == EXIT_SKIP:
            reason = next((line for line in log.splitlines() if "SKIP" in line), "prepare.sh skipped")
            say(f"SKIP: {re.sub(r'^.*SKIP: *', '', reason.strip())} (scripts/devices/prepare.sh {arch})")
            say(
                "The device check needs root, apt-get (for qemu-user-static and debootstrap) "
                "and network access to Debian and PyPI."
            )
            return EXIT_SKIP
        if rc:
            say(
                f"FAIL: scripts/devices/prepare.sh {arch} exited {rc}; "
                f"last lines of {CACHE / 'logs' / f'prepare-{arch}.log'}:"
            )
            say("\n".join("  " + line for line in log.splitlines()[-15:]))
            return EXIT_FAIL
    qemu = subprocess.run(
        ["qemu-aarch64-static" if "arm64" in arches else "qemu-arm-static", "--version"],
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.splitlines()[0]

    # 2. models, 3. stage
    try:
        info = models(host_python, timings)
        t0 = time.perf_counter()
        extra = {}
        for v in ort_versions if "arm64" in arches else ():
            try:
                extra[v] = ort_pythonpath(v, host_python)
            except CheckError as e:
                if not sweep:
                    raise
                say(f"ORT {v}: {e}")
        if extra:
            timings["ORT wheels"] = (time.perf_counter() - t0, " ".join(extra))
    except CheckError as e:
        say(f"FAIL: {e}")
        return EXIT_FAIL
    work = Path(tempfile.mkdtemp(prefix="craft-devices-"))
    try:
        stage = stage_runtime(work)
        runs = plan(arches, list(extra), sweep)
        for r in runs:
            r.pythonpath = extra.get(r.ort, "")
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(lambda r: execute(r, cap, stage, work, info, host_python), runs))
        timings["runs"] = (time.perf_counter() - t0, f"{len(done)} runs, {jobs} at a time")
        est = {m: predicted(host_python, info[m]["path"]) for m in ("tiny", "small")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(done, info, cap, budget_mb, budget_src, qemu, est, timings, t_start, sweep)


def report(
    runs: list[Run],
    info: dict,
    cap: MemoryCap,
    budget_mb: int,
    budget_src: str,
    qemu: str,
    est: dict,
    timings: dict,
    t_start: float,
    sweep: bool = False,
) -> int:
    failures: list[str] = []
    ref = {(r.backend, r.model): r.result for r in runs if r.arch == "x86_64"}
    t = info["tiny"]
    say(f"qemu: {qemu}")
    for arch in ("x86_64", "arm64", "armhf"):
        dev = next(
            (
                r.result["device"]
                for r in sorted(runs, key=lambda r: r.model != "tiny")  # tiny: sentencepiece
                if r.arch == arch and not r.ort and "device" in r.result
            ),
            None,
        )
        if dev:
            pkgs = " ".join(f"{k}={v}" for k, v in dev["packages"].items() if v)
            say(
                f"{'host' if arch == 'x86_64' else 'guest'} {dev['machine']} ({dev['pointer_bits']}-bit): "
                f"python {dev['python']} {pkgs}"
            )
    say(
        f"models: tiny.int8.onnx {t['bytes'] / 1e6:.2f} MB (sentencepiece 512, trained {t.get('train_s', '?')}s), "
        f"small.int8.onnx {info['small']['bytes'] / 1e6:.1f} MB (15M class, random weights); "
        f"opset {t['opsets'].get('ai.onnx')}, IR {t['ir_version']}, "
        f"only ai.onnx ops: {all('::' not in op for op in t['ops'])}"
    )
    say(f"cap: {cap.describe()}  [{budget_src}]")
    say("")
    say(
        f"{'machine':8s} {'cpu':11s} {'backend':7s} {'model':12s} {'ORT':7s} {'tokens':>6s}  {'vs x86_64':28s} "
        f"{'VmHWM':>7s} {'cg peak':>7s} {'tok/s':>6s} {'wall':>6s}"
    )
    for r in sorted(runs, key=lambda r: (r.model, ["x86_64", "arm64", "armhf"].index(r.arch), r.cpu, r.backend, r.ort)):
        res = r.result
        dev = res.get("device", {})
        machine = dev.get("machine", ARCH_MACHINE[r.arch])
        ort = (dev.get("packages") or {}).get("onnxruntime") or "-"
        if not res.get("ok"):
            failures.append(f"{r.name}: {res.get('error', 'failed')}")
            say(
                f"{machine:8s} {r.cpu:11s} {r.backend:7s} {r.model:12s} {ort:7s} {'-':>6s}  "
                f"FAILED: {res.get('error', '')[:200]}"
            )
            continue
        n = len(res["tokens"])
        want = TINY_TOKENS if r.model in GATED else SMALL_TOKENS
        if r.arch == "x86_64":
            other = ref.get(("numpy" if r.backend == "ort" else "ort", r.model), {})
            same = not other.get("ok") or other.get("tokens") == res["tokens"]
            verdict = "reference" + ("" if same else " (ort != numpy)")
            if r.model in GATED and not same and r.backend == "numpy":
                k = first_difference(other["tokens"], res["tokens"])
                gap = tie_gap(info[r.model]["path"], "ort", other["tokens"], res["tokens"], k)
                if gap is not None and gap <= NEAR_TIE:
                    verdict, r.near_tie = f"reference (near tie {k})", True
                else:
                    failures.append(f"x86_64 {r.model}: the ort and numpy backends' greedy outputs differ at token {k}")
        else:
            base = ref.get((r.backend, r.model), {})
            same = bool(base.get("ok")) and base.get("tokens") == res["tokens"] and base.get("text") == res["text"]
            if same:
                verdict = "identical"
            else:
                reference = base.get("tokens") or []
                k = first_difference(reference, res["tokens"])
                verdict = f"DIFFERS at token {k}"
                if r.model not in GATED:  # informational: no model is run again for it
                    verdict += " (info)"
                else:
                    gap = (
                        tie_gap(info[r.model]["path"], r.backend, reference, res["tokens"], k)
                        if base.get("ok")
                        else None
                    )
                    if gap is not None and gap <= NEAR_TIE:
                        verdict, r.near_tie = f"near tie at token {k} ({gap:.4f})", True
                    else:
                        failures.append(f"{r.name}: greedy output differs from x86_64 {r.backend} at token {k}")
        if dev.get("forbidden_loaded") or dev.get("forbidden_attempts"):
            failures.append(f"{r.name}: imported {dev.get('forbidden_loaded') or dev.get('forbidden_attempts')}")
        if machine != ARCH_MACHINE[r.arch]:
            failures.append(f"{r.name}: ran on {machine}, expected {ARCH_MACHINE[r.arch]}")
        if not dev.get("craft_from", "").endswith("stage/craft"):
            failures.append(f"{r.name}: craft imported from {dev.get('craft_from')}, not the staged runtime")
        if n != want and (res["stats"] or {}).get("stop_reason") != "context_length":
            failures.append(f"{r.name}: generated {n} tokens, expected {want}")
        hwm = dev.get("vmhwm_mb")
        peak = res.get("peak_mb")
        tps = (res.get("stats") or {}).get("decode_tokens_per_s", 0)
        say(
            f"{machine:8s} {r.cpu:11s} {r.backend:7s} {r.model:12s} {ort:7s} {n:6d}  {verdict:28s} "
            f"{(f'{hwm:.0f}MB' if hwm else '-'):>7s} {(f'{peak:.0f}MB' if peak else '-'):>7s} "
            f"{tps:6.1f} {res['wall_s']:5.1f}s"
        )
    small_native = ref.get(("numpy", "small"), {})
    hwm = (small_native.get("device") or {}).get("vmhwm_mb")
    if hwm and hwm > budget_mb:
        failures.append(
            f"small int8 numpy peak RSS {hwm:.0f} MB on x86_64 exceeds the Pi Zero 2 W budget {budget_mb} MB"
        )
    say("")
    say(
        "VmHWM: the process's peak RSS; under qemu that is the emulator's own RSS (guest memory + translated code), "
        "an upper bound of the guest's.\n"
        "cg peak: the run's cgroup peak (RSS + page cache), counting only pages this run touched first "
        "(shared libraries already cached by an earlier run are not charged again)."
    )
    if not sweep:
        say(
            f"predicted by craft-run --estimate for pi-zero-2w (numpy): tiny {est['tiny']}, small {est['small']}; "
            "measured x86_64 numpy: "
            f"tiny {(ref.get(('numpy', 'tiny'), {}).get('device') or {}).get('vmhwm_mb', 0):.0f} MB, "
            f"small {hwm or 0:.0f} MB"
        )
    total = time.perf_counter() - t_start
    say("time: " + " | ".join(f"{k} {fmt_s(v[0])} ({v[1]})" for k, v in timings.items()) + f" | total {fmt_s(total)}")
    summary = {
        "failures": failures,
        "total_s": total,
        "cap": cap.describe(),
        "runs": [{"name": r.name, **{k: v for k, v in r.result.items() if k != "text"}} for r in runs],
    }
    try:
        (CACHE / "last-check.json").write_text(json.dumps(summary, indent=1))
    except OSError:
        pass
    if failures:
        say(f"RESULT: FAIL ({len(failures)})")
        for f in failures:
            say(f"  - {f}")
        return EXIT_FAIL
    if sweep:
        say(
            f"RESULT: PASS - every onnxruntime version tested ({', '.join(r.ort for r in runs if r.ort)}) "
            "runs the tiny int8 file "
            f"on emulated aarch64 with greedy output identical to x86_64"
        )
        return EXIT_OK
    ties = ", ".join(r.name for r in runs if r.near_tie)
    say(
        f"RESULT: PASS - tiny (int8, q4_1, rotated) and recurrent greedy output token-for-token identical to x86_64 on "
        f"every machine and backend{f' (or parting at a near tie: {ties})' if ties else ''}; "
        f"small int8 generated under the {cap.limit_mb} MiB cap everywhere ({len(runs)} runs, "
        f"only {', '.join(['numpy', 'onnxruntime', 'sentencepiece', 'click'])} loaded; "
        f"never {FORBIDDEN_NOTE})"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
