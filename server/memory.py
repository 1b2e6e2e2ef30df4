"""The server process's allocator settings: memory a call held is given back to the system when it ends.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own mapping, unmapped when
freed, and everything smaller from heaps ("arenas") it rarely shrinks. By default that threshold moves up
to 32 MB as the process frees large blocks, so after a few large request bodies (an 8 MB image, a
100-image support set) those bodies land in arenas and the process keeps them: six refused 256 MB streams
left the server at 2.0 GB idle against 0.34 GB at start (issue 34). :func:`configure` fixes the threshold at
``MMAP_THRESHOLD`` (any block of 1 MB or more is returned when freed) and trims the heap top at
``TRIM_THRESHOLD``, and caps the number of arenas at ``ARENA_MAX`` (glibc makes up to 8 per core, one per thread
that contends, and blocks freed in one arena are not reused by another: after three rounds of six refused 4 MB-chunk
streams the idle process kept +95 MB with the default, +43 MB with two arenas; ``MALLOC_ARENA_MAX`` in the
environment overrides it). :func:`trim` returns the free pages of every arena (``malloc_trim``), which the server
runs when a large call ends. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

log = logging.getLogger("fewshot.server")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: Blocks of this size or more get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
#: Free memory at the top of the main heap beyond this is returned.
TRIM_THRESHOLD = 16 << 20
#: malloc arenas at most (the server's work runs in ONNX Runtime's and torch's own pools; Python holds the GIL).
ARENA_MAX = 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def configure() -> bool:
    """Fix glibc's mmap and trim thresholds and its number of arenas for this process (see the module); whether
    it applied. Call it before the server starts its threads: an arena once made stays."""
    if _LIBC is None:
        return False
    arenas = "MALLOC_ARENA_MAX" in os.environ or bool(_LIBC.mallopt(M_ARENA_MAX, ARENA_MAX))
    return arenas and bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class Trimmer:
    """Runs ``malloc_trim(0)`` in its own thread after calls that held at least ``large`` bytes end, at most
    once per ``every`` seconds (it walks every arena: a few milliseconds, kept off the workers)."""

    def __init__(self, large: int = 16 << 20, every: float = 1.0) -> None:
        self.large, self.every = large, every
        self._wanted = threading.Event()
        if _LIBC is not None:
            threading.Thread(target=self._run, name="fewshot-trim", daemon=True).start()

    def after(self, held: int) -> None:
        """A call that held ``held`` bytes of body ended."""
        if held >= self.large:
            self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            time.sleep(self.every)  # let the call's last references go, and coalesce a burst of calls
            self._wanted.clear()
            trim()


def trim() -> None:
    """Give the free pages of every malloc arena back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


#: Resident memory above the level after warm-up, beyond the task cache and the request bodies, at the peak
#: (ONNX Runtime arenas, gRPC's buffers, allocator slack): measured 87 MB under 3 clients adapting 20-way tasks
#: with --cache-mb 256, 70 MB under six refused 8.3 MB-chunk streams (scripts/memory_probe.py, BENCHMARKS.md).
OVERHEAD_MB = 128
#: Resident bytes per byte of request body charged (the bytes, what is parsed from them, gRPC's own copies).
BODY_FACTOR = 1.5
#: Resident bytes per byte of a message gRPC is still receiving, not yet charged (its own buffer, then the
#: bytes it hands the server before they are charged).
RECEIVING_FACTOR = 2.0


def peak_bound_mb(cache_mb: float, body_mb: float = 0.0, receiving_mb: float = 0.0) -> float:
    """The bound on resident memory (docs/serving.md) above its level after warm-up, at the peak: the task cache
    (``--cache-mb``), ``BODY_FACTOR`` times the request bodies in flight (at most ``--max-inflight-body-mb``),
    ``RECEIVING_FACTOR`` times the messages being received (``receiving_mb``: at most one message per open call,
    which gRPC assembles whole before the server sees and charges it), ``OVERHEAD_MB`` and the support features kept
    for explained answers (:data:`fewshot.server.explain.CACHE_BYTES`). Decoded pixels of the
    calls running come on top (each call at most ``--max-call-megapixels``; a few MB for the shipped models'
    image sizes)."""
    from fewshot.server.explain import CACHE_BYTES

    return cache_mb + BODY_FACTOR * body_mb + RECEIVING_FACTOR * receiving_mb + OVERHEAD_MB + CACHE_BYTES / (1 << 20)
