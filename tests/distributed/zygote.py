"""Start many short multi-rank runs quickly: one process imports torch and megalm once, then forks each rank.

Used by the fault trials, which launch dozens of 3-rank runs: a rank started this way is a real process with
its own sockets and threads (it forks before running any torch operation), killed and stopped by real signals;
only the import time (seconds per process on 2 cores) is saved. Protocol, one JSON object per line:
stdin  {"env": {...}, "args": [...], "stdout": PATH, "stderr": PATH}  ->  stdout {"pid": PID}
stdout {"exited": PID, "status": CODE, "at": MONOTONIC_SECONDS}   whenever a child ends.
"""
from __future__ import annotations

import json
import os
import select
import sys
import time
import traceback

import megalm.cli  # noqa: F401  (everything a rank imports, imported once)
import megalm.train.loop  # noqa: F401


def _child(spec: dict) -> None:
    code = 1
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(spec[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.environ.update(spec["env"])
        if "OMP_NUM_THREADS" in spec["env"]:      # torch read its thread count when the zygote imported it
            import torch
            torch.set_num_threads(int(spec["env"]["OMP_NUM_THREADS"]))
        code = megalm.cli.main(spec["args"]) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    buffer = b""
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.02)
        if readable:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line))
                print(json.dumps({"pid": pid}), file=out, flush=True)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            print(json.dumps({"exited": pid, "status": os.waitstatus_to_exitcode(status), "at": time.monotonic()}),
                  file=out, flush=True)


if __name__ == "__main__":
    main()
