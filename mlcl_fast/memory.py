"""Memory: what this process holds (resident set, its peak), and what one loss call would hold.

Process memory is read from Linux's /proc/self/status (VmRSS, VmHWM); the peak can be reset
through /proc/self/clear_refs, so one process can measure one call's own peak. Elsewhere the
readers return None (and `peak_memory_mb` falls back to ru_maxrss). glibc keeps freed blocks
below its mmap threshold in the heap, which would hide a later call's allocations from the peak;
`exact_malloc()` makes every block of 64 KiB and up a fresh mapping for a memory pass, and
`steady_malloc()` restores a large threshold (the steady state glibc's dynamic threshold reaches
on its own) before timing, so timings see no extra page faults.

The predictions size a call before it is made (the benchmark refuses points above its budget, the
main job reports what the reference would need where it cannot run): they are estimates with
generous constants, not measurements.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from typing import Optional

import torch

MiB = 1 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


# ------------------------------------------------------------------------- this process (Linux)

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> Optional[int]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def available_memory_bytes() -> Optional[int]:
    """What the machine can still give (MemAvailable), or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Set the peak RSS to the current RSS; False where the kernel does not allow it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def exact_malloc() -> bool:
    """Freed blocks of 64 KiB and up go back to the kernel at once (RSS follows live memory)."""
    return _mallopt(M_MMAP_THRESHOLD, 64 * 1024) and _mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def steady_malloc() -> bool:
    """Reuse freed blocks up to 32 MiB from the heap, as glibc settles to by itself."""
    return _mallopt(M_MMAP_THRESHOLD, 32 * MiB) and _mallopt(M_TRIM_THRESHOLD, 64 * MiB)


def peak_memory_mb(device: str = "cpu") -> tuple[float, Optional[float]]:
    """(peak resident memory of this process so far, in MB; peak allocated CUDA memory or None).
    Linux reports the peak as VmHWM; elsewhere ru_maxrss (KB on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        rss = kib / 1024
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
    cuda = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        cuda = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return round(float(rss), 1), None if cuda is None else round(cuda, 1)


# ------------------------------------------------------------------ one loss call (predicted)

def fused_bytes(N: int, L: int, d: int, K: int) -> int:
    """SPEC's bound for the fused backends, O((N + L)·(d + K)), with a generous constant."""
    return 16 * (N + L) * (d + K) * 4 + 64 * MiB


def reference_bytes(anchors: int, columns: int, N: int, L: int, d: int, K: int) -> int:
    """The reference holds about a dozen live |A| x |C| fp32 matrices at its peak (logits, masks,
    overlap, weights, log-probabilities, autograd buffers), plus dense [|C|, L] label rows."""
    return 14 * anchors * columns * 4 + 2 * columns * (L + 1) + fused_bytes(N, L, d, K)
