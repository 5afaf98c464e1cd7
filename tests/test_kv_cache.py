"""The KV-cache buffers (runtime/kv_cache.py) commit memory as tokens arrive, not when allocated
and not 2 MB per head at the first token (numpy's transparent-huge-page hint on large arrays)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from craft.runtime.kv_cache import cache_buffer

STATUS = Path("/proc/self/status")
HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def resident_mb() -> float:
    return int(STATUS.read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not STATUS.exists(), reason="needs Linux's /proc/self/status")
@pytest.mark.skipif(
    not HUGE_PAGES.exists() or "[never]" in HUGE_PAGES.read_text(),
    reason="this kernel gives no transparent huge pages: any buffer commits page by page here",
)
def test_a_first_prompt_commits_only_its_own_positions():
    shape = (1, 3, 8192, 64)  # one of SmolLM2-135M's 60 key / value buffers at 8192 positions: 6 MB
    buffers = [cache_buffer(shape) for _ in range(16)]  # 96 MB reserved
    before = resident_mb()
    for buffer in buffers:
        buffer[:, :, :37] = 1.0  # a 37-token prompt: 28 KB per buffer
    grown = resident_mb() - before
    assert grown < 8, f"{grown:.0f} MB committed for 0.45 MB of cache"  # np.zeros here: 64-96 MB (2 MB a head)
    assert all(b.dtype == np.float32 and b.shape == shape and b.flags.writeable for b in buffers)
    assert not buffers[0][:, :, 37:].any() and buffers[0][:, :, :37].all()  # zero-filled, and written


def test_empty_shapes():
    assert cache_buffer((1, 2, 0, 8)).shape == (1, 2, 0, 8)


@pytest.mark.parametrize("positions", [1 << 40, 1 << 62], ids=["2 PB", "past ssize_t"])
def test_a_cache_larger_than_memory_is_an_oserror_that_says_so(positions):
    with pytest.raises(OSError, match="cannot allocate the KV-cache .* --max-context needs less"):
        cache_buffer((1, 8, positions, 64))
    with pytest.raises(OSError, match="of 8000 sequences; a smaller --max-context or fewer prompts in a batch"):
        cache_buffer((8000, 8, positions, 64))  # generate_batch: the batch is the cause as much as the context


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_share_the_cache():
    cache = cache_buffer((1, 2, 16, 8))
    cache[:] = 2.0
    pid = os.fork()
    if pid == 0:  # the child writes its own copy, and leaves without running pytest's exit handlers
        cache[:] = 7.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert (cache == 2.0).all()
