"""The KV-cache's preallocated buffers, for both backends.

A cache holds context_length positions from the start (the in-place graph writes each step into
it; the numpy backend slices it), but a conversation fills it a token at a time, and memory
should be committed the same way. numpy asks the kernel for transparent huge pages on any array
of 4 MB or more (and some systems give them to every large anonymous allocation), and a huge page
is committed whole at its first write: each key/value head's first token then commits 2 MB -
SmolLM2-135M with an 8192-position cache took 240 MB more at its first prompt than at 4096
positions, where each buffer stays under 4 MB. A private anonymous mapping marked "no huge
pages" is committed 4 KB at a time as the tokens arrive (+3 MB there). Decode reads the cache
through 4 KB pages then: SmolLM2-135M int8 at 200 tokens of context measured 1-3% slower than
with huge pages, for 240 MB less.
"""

from __future__ import annotations

import errno
import math
import mmap

import numpy as np


def cache_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros of `shape` whose memory is committed page by page as it is written (a private
    anonymous mapping, which the kernel zero-fills); the array keeps the mapping alive. OSError,
    one line naming the KV-cache and --max-context, when the machine cannot map that much."""
    count = math.prod(shape)
    try:
        if hasattr(mmap, "MAP_PRIVATE"):  # POSIX: not shared with a child after fork()
            mapping = mmap.mmap(-1, max(count * 4, 1), flags=mmap.MAP_PRIVATE)  # a zero-length map is an error
        else:  # Windows: anonymous mappings are private to the process
            mapping = mmap.mmap(-1, max(count * 4, 1))
    except (OSError, OverflowError, ValueError) as e:  # no memory, or larger than the address space
        raise OSError(
            getattr(e, "errno", None) or errno.ENOMEM,
            f"cannot allocate the KV-cache ({count * 4 / 2**20:,.0f} MB for one layer's keys or values of "
            f"{shape[0]} sequence{'s' * (shape[0] != 1)}; a smaller --max-context"
            f"{' or fewer prompts in a batch' if shape[0] > 1 else ''} needs less)",
        ) from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: ordinary pages even where huge ones are the default
        try:
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # advice only: a kernel (or an emulator) that does not take it changes nothing else
            pass
    return np.frombuffer(mapping, np.float32, count=count).reshape(shape)
