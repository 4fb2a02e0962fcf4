"""What the C library and the kernel say about this process's memory: glibc's malloc tuning and trimming, and the
host RAM available. Kept apart from the host-RAM estimate (memory/host_ram.py) because the layers that free memory
(merges, steps, export) sit below the estimator."""

from __future__ import annotations

import ctypes

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 (glibc only: musl and other C libraries lack it)
except (OSError, AttributeError):
    _LIBC = None

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MAP_FROM_BYTES = 8 * 2**20  # 1 MiB cost a tiny CPU run 10% of its speed; 8 MiB nothing measurable


def map_large_allocations() -> None:
    """Have glibc map every block of MAP_FROM_BYTES or more on its own, so that freeing a tensor returns its memory
    at once. By default glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), after
    which such tensors come from its heap and stay there when freed: the forward of a CPU step of a 1.3B-shaped
    model then held 0.16 GiB more than with this, its backward 0.05 GiB more (docs/memory.md)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MAP_FROM_BYTES)


def release_freed_memory() -> None:
    """Hand memory that Python and torch already freed back to the system (glibc's malloc_trim). glibc keeps freed
    blocks below its mmap threshold (which grows to 32 MiB) in its heap; quantizing a layer frees several of them,
    and across a merge of hundreds of layers the process would otherwise hold gigabytes it does not use."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
