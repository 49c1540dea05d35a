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
