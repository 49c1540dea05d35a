"""This process's peak resident memory, its own: Linux keeps ``ru_maxrss`` across ``execve``, so a child started
from a large parent would report the parent's peak; ``VmHWM`` belongs to the process's own address space."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # kilobytes on Linux


def allocated_bytes(requested: int) -> int:
    """What CPython's small-object allocator hands out for an object of ``requested`` bytes (``sys.getsizeof``):
    blocks come in multiples of 16 bytes on 64-bit builds (a 36-byte int takes 48, a 49-byte digest 64)."""
    return -(-requested // 16) * 16
