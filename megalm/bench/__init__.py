"""Benchmarks: each a ``megalm bench NAME`` command that prints its figures beside a baseline measured in the
same run and writes one JSON result (``harness.write_result``) and a PNG under ``runs/bench-NAME/`` (or --out).
``harness`` holds what they share; no benchmark keeps a timer, a peak or an output format of its own."""
