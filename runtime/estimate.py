"""Will this .onnx fit on a device, and how fast will it decode there? (craft-run --estimate)

A rough, documented model - good to a factor of ~1.5, meant to tell "fits / does not fit" and
"tens vs hundreds of tokens/s" before a file is copied to a board:

  memory   peak RSS = runtime base + k * file size + KV-cache at the context (--max-context, else the
           model's; a recurrent file: its fixed state, the same at any context), with base and k
           measured for each backend on x86_64 (RSS_MODEL below); must fit in memory_mb minus
           os_reserved_mb of the device profile. The same arithmetic, run against this machine's
           available memory, is craft-run's default --max-context (fitting_context): a model
           declaring 8192 positions gets the context that fits.
  speed    decode on Pi-class boards is memory-bound: each token streams every weight from RAM
           (15 MB for the 15M-class int8 model; their caches are 0.5-2 MB). Time per token =
           bytes read / (EFFICIENCY * bandwidth) + the backend's fixed per-token work (graph
           nodes, Python loop), measured on this x86 core and scaled by the profile's
           core_slowdown.

Device profiles are flat `key: value` files in configs/devices/ (no YAML library needed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from craft.runtime.artifact import RECURRENT, Artifact, ArtifactError
from craft.runtime.weights import ROPE_COS, ROPE_SIN, SCHEMES, float_weights, scheme_weights

# configs/ sits beside runtime/: at the repository root in a checkout, inside the craft package in
# an installed wheel (setup.py ships it as package data).
DEVICES_DIR = Path(__file__).resolve().parent.parent / "configs" / "devices"

# (base MB, MB of RSS per MB of file) for (backend, quantized) - measured with craft-run --stats on x86_64, Python 3.11:
# 15M-class int8 (15.7 MB) 104 / 119 MB, fp32 (61 MB) 180 / 157 MB, small int8 (7.5 MB) 84 / 76 MB.
RSS_MODEL = {
    ("ort", True): (66.0, 2.45),
    ("ort", False): (66.0, 1.9),
    ("numpy", True): (37.0, 5.2),
    ("numpy", False): (37.0, 2.0),
}
EFFICIENCY = (
    0.5  # share of one-core copy bandwidth a GEMV-bound decode step achieves (typical for llama.cpp-class code)
)
FIXED_MS = {"ort": 0.45, "numpy": 0.8}  # per-token work besides streaming weights, on this machine's core (15M-class)


class DeviceError(ValueError):
    """A missing or malformed device profile; one line naming the file or the valid names."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str
    cores: int
    memory_mb: float
    os_reserved_mb: float
    bandwidth_gbs: float
    ort_wheel: bool
    core_slowdown: float = 1.0  # one core of the board vs one core of the x86 machine FIXED_MS was measured on


def parse_profile(path: Path) -> DeviceProfile:
    """Read a flat `key: value  # comment` file into a DeviceProfile."""
    values: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DeviceError(f"{path} line {number}: expected 'key: value', got '{line}'")
        values[key.strip()] = value.strip()
    kinds = {f.name: f.type for f in fields(DeviceProfile)}
    unknown = values.keys() - kinds.keys()
    if unknown:
        raise DeviceError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(kinds)}")
    try:
        converted = {
            k: (
                v.lower() == "true"
                if kinds[k] == "bool"
                else float(v)
                if kinds[k] == "float"
                else int(v)
                if kinds[k] == "int"
                else v
            )
            for k, v in values.items()
        }
        return DeviceProfile(**converted)
    except (TypeError, ValueError) as e:
        raise DeviceError(f"{path}: {e}") from None


def load_profiles(folder: Path = DEVICES_DIR) -> list[DeviceProfile]:
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise DeviceError(f"no device profiles in {folder} (Craft ships them in configs/devices/)")
    return [parse_profile(f) for f in files]


@dataclass(frozen=True)
class Estimate:
    device: DeviceProfile
    backend: str
    rss_mb: float
    available_mb: float
    bytes_per_token: float
    tokens_per_s: float
    cache_bytes: int = 0  # per sequence: the KV-cache at `context`, or a recurrent file's state
    recurrent: bool = False
    context: int = 0  # the context counted: --max-context, else the model's
    max_context: int = 0  # the longest context whose peak RSS fits in available_mb (0: not even a short one)

    @property
    def fits(self) -> bool:
        return self.rss_mb <= self.available_mb


def cache_bytes(artifact: Artifact, context: int) -> int:
    """What one sequence carries between steps: key + value float32 tensors of every layer at
    `context` positions, or a recurrent file's state (n_layer x dim float32, whatever the context)."""
    spec = artifact.spec
    if spec.arch == RECURRENT:
        return spec.n_layer * spec.dim * 4
    return 2 * spec.n_layer * spec.n_kv_head * spec.head_dim * context * 4


def batch_prefill_bytes(artifact: Artifact, rows: int, width: int, context: int) -> int:
    """About what a left-padded batch holds at its one-call prefill besides the weights, per row: its
    cache at `context` (twice: ort's past + present), every position's logits (an in-place file's batch
    computes them all) and activations twice, and one layer's attention scores four times: the backends'
    temporaries (fits the 2.3-2.9 MB a row measured for the tiny preset's 127-token rows, both backends)."""
    spec = artifact.spec
    logits = width * spec.vocab_size * 4
    scores = 0 if spec.arch == RECURRENT else spec.n_head * width * width * 4
    activations = width * (3 * spec.dim + 2 * spec.hidden_dim) * 4
    return rows * (2 * cache_bytes(artifact, context) + 2 * (logits + 2 * scores + activations))


def weight_values(artifact: Artifact) -> int:
    """How many numbers the model's weights hold (each stored float32 by the numpy backend)."""
    shapes = [*scheme_weights(artifact.spec).values(), *float_weights(artifact.spec).values()]
    return sum(math.prod(shape) for shape in shapes)


def peak_rss_mb(artifact: Artifact, file_bytes: int, backend: str, context: int) -> float:
    """Predicted peak resident memory of craft-run with a cache of `context` positions (RSS_MODEL)."""
    if artifact.quantization not in SCHEMES:
        raise ArtifactError(
            f"the file's quantization '{artifact.quantization}' is unknown to this runtime "
            f"(it knows {', '.join(SCHEMES)}); upgrade craft or re-export the file"
        )
    base, per_mb = RSS_MODEL[(backend, SCHEMES[artifact.quantization].weight_bits < 32)]
    copies = 2 if backend == "ort" else 1  # ort holds past + present
    return base + per_mb * file_bytes / 2**20 + copies * cache_bytes(artifact, context) / 2**20


def fitting_context(artifact: Artifact, file_bytes: int, backend: str, available_mb: float) -> int:
    """The longest context, at most the model's, whose peak_rss_mb fits in available_mb; 0 when
    not even one position does (the weights alone are too big). A recurrent file: all or nothing."""
    model = artifact.spec.context_length
    without_cache = peak_rss_mb(artifact, file_bytes, backend, 0)
    per_position = peak_rss_mb(artifact, file_bytes, backend, 1) - without_cache  # linear in context; 0 if recurrent
    if per_position == 0:
        return model if without_cache <= available_mb else 0
    return max(0, min(model, int((available_mb - without_cache) / per_position)))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory_mb() -> float | None:
    """Memory this process could still get: Linux's MemAvailable (less under a cgroup v2 memory
    limit), else free physical pages; None where the system does not say (macOS)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, AttributeError):
            return None
    try:  # inside a container the cgroup's limit may be far below the machine's free memory
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, (int(limit) - int((cgroup / "memory.current").read_text())) / 2**20)
    except (OSError, ValueError):
        pass
    return available


def estimate(
    artifact: Artifact, file_bytes: int, device: DeviceProfile, backend: str | None = None, context: int | None = None
) -> Estimate:
    """Predicted peak memory and decode speed of this file on `device`, batch 1, with a cache of
    `context` positions (default: the model's context)."""
    backend = backend or ("ort" if device.ort_wheel else "numpy")
    context = context or artifact.spec.context_length
    rss = peak_rss_mb(artifact, file_bytes, backend, context)
    available = device.memory_mb - device.os_reserved_mb
    recurrent = artifact.spec.arch == RECURRENT
    cache = cache_bytes(artifact, context)
    # ort streams the stored weights; numpy expands every one to float32 at load (whatever the scheme's mix).
    # Not the RoPE tables, float32 in both: a step reads one row of each (a 131k-context Llama-3.2 stores
    # 64 MiB of them, 5% of its int8 file; 98% of a tiny one's)
    floats = float_weights(artifact.spec)  # a recurrent file has no tables
    rope = 4 * sum(math.prod(floats[name]) for name in (ROPE_COS, ROPE_SIN) if name in floats)
    weight_bytes = (4 * weight_values(artifact) if backend == "numpy" else file_bytes) - rope
    if recurrent:  # the state is read and written once per token, whatever the context
        per_token = weight_bytes + 2 * cache
    else:
        per_token = weight_bytes + cache / 2 * (3 if backend == "ort" else 1)  # avg context; ort's Concat copies it
    seconds = per_token / (EFFICIENCY * device.bandwidth_gbs * 1e9) + FIXED_MS[backend] * device.core_slowdown / 1e3
    fitting = fitting_context(artifact, file_bytes, backend, available)
    return Estimate(device, backend, rss, available, per_token, 1.0 / seconds, cache, recurrent, context, fitting)


def cache_column(e: Estimate) -> str:
    """What a sequence carries between steps: 'KV 1.5MB' (the cache at the context) or 'state 6.9kB'."""
    size = f"{e.cache_bytes / 2**20:.1f}MB" if e.cache_bytes >= 2**20 else f"{e.cache_bytes / 1024:.1f}kB"
    return f"state {size}" if e.recurrent else f"KV {size}"


def format_estimates(estimates: list[Estimate]) -> str:
    lines = [
        f"{'device':12s} {'backend':8s} {'context':>8s} {'cache/state':>14s} {'peak RSS':>10s} {'available':>10s} "
        f"{'fits':>5s} {'max context':>12s} {'MB/token':>9s} {'tokens/s':>9s}"
    ]
    for e in estimates:
        lines.append(
            f"{e.device.name:12s} {e.backend:8s} {e.context:8d} {cache_column(e):>14s} {e.rss_mb:8.0f}MB "
            f"{e.available_mb:8.0f}MB {'yes' if e.fits else 'NO':>5s} {e.max_context:12d} "
            f"{e.bytes_per_token / 2**20:9.1f} {e.tokens_per_s:9.0f}"
        )
    return "\n".join(lines)
