"""Start-up, one way: ``env`` (launcher discovery, device, environment variables), ``process`` (process group,
topology), ``spawn`` (a local multi-process helper for tests and benchmarks)."""
from megalm.runtime.env import LaunchInfo, discover, pick_device
from megalm.runtime.process import Runtime, finish, start

__all__ = ["LaunchInfo", "Runtime", "discover", "finish", "pick_device", "start"]
