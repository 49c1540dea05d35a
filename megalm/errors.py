"""How a user-facing error ends a run: one clear line per rank, exit status 2, no traceback for known errors.

The line names the rank the launcher gave (read by the same discovery as start-up) and the host.
"""
from __future__ import annotations

import os
import socket
import sys

from megalm.checkpoint.format import CheckpointError
from megalm.config import ConfigError

KNOWN = (ConfigError, CheckpointError)


def origin() -> str:
    """'rank R on HOST' for this process, as the launcher numbered it."""
    from megalm.runtime.env import discover

    try:
        rank = discover().rank
    except (ValueError, KeyError):            # a malformed launcher variable: still say where
        rank = "?"
    return f"rank {rank} on {socket.gethostname()}"


def report(error: BaseException) -> int:
    """Print ``error`` for the user and return the exit status; unknown errors keep their traceback."""
    known = isinstance(error, KNOWN) or type(error).__module__.startswith("megalm")
    if not known and not isinstance(error, (ValueError, FileNotFoundError)):
        raise error
    if os.environ.get("MEGALM_TRACEBACK"):
        raise error
    print(f"megalm: error ({origin()}): {error}", file=sys.stderr, flush=True)
    return 2
