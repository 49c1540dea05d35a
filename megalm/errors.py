"""How a user-facing error ends a run: one clear line per rank, exit status 2, no traceback for known errors."""
from __future__ import annotations

import os
import sys

from megalm.checkpoint.format import CheckpointError
from megalm.config import ConfigError
from megalm.parallel.topology import LayoutError

KNOWN = (ConfigError, CheckpointError, LayoutError)


def report(error: BaseException) -> int:
    """Print ``error`` for the user and return the exit status; unknown errors keep their traceback."""
    known = isinstance(error, KNOWN) or type(error).__module__.startswith("megalm")
    if not known and not isinstance(error, (ValueError, FileNotFoundError)):
        raise error
    if os.environ.get("MEGALM_TRACEBACK"):
        raise error
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    print(f"megalm: error (rank {rank}): {error}", file=sys.stderr, flush=True)
    return 2
