"""Keep freed memory in the process (glibc's malloc).

By default glibc serves every allocation above a threshold (128 KiB, raised dynamically up to
32 MiB) with a fresh ``mmap`` and returns it to the system when freed, and it trims the heap's top
as soon as it is free. A gradient-graph pass allocates and frees tensors of megabytes by the
thousand; each fresh page costs a page fault (and zeroing) on first touch, and on a two-core machine
that took a third of an LRP pass. ``keep_freed_memory`` makes malloc reuse what was freed: blocks
up to 32 MiB come from the heap, and the heap is not trimmed. The process's memory then stays at its
peak until it exits, which is what a study run wants; the ``gradgraph`` command and the benchmarks
call it, a library user may. ``hand_back`` returns the free pages between units of work (a
study's batches), so that what one batch left free and scattered does not add to the next one's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's upper limit for the mmap threshold on 64-bit systems


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where there is no glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),
            mallopt(_M_TOP_PAD, 256 * 2**20)]
    return all(done)


def hand_back() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``); False where there is
    no glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


__all__ = ["hand_back", "keep_freed_memory"]
