"""What the planner knows of a machine: its matmul rate, the training step's efficiency, its collectives' costs;
the datasheet's by default, or measured by ``megalm plan --calibrate`` (``megalm.bench.calibrate``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Machine:
    """What the planner needs of a machine; the defaults describe an H100 node (datasheet, NVLink, InfiniBand)."""
    device: str = "cuda"
    matmul_flops: float = 989e12
    """One device's dense matmul rate at the training precision (CPU: with every core)."""
    matmul_flops_one_thread: float = 0.0
    """CPU only: the rate of one thread while every core multiplies (ranks sharing a host get one thread each
    under torchrun, and share its caches and memory bandwidth)."""
    cores: int = 0
    """CPU only: cores per host."""
    efficiency: float = 0.45
    """Fraction of the matmul rate the training step's forward and backward reach."""
    optimizer_s_per_param: float = 1e-11
    latency_s: dict = field(default_factory=lambda: {"intra": 1e-5, "inter": 2e-5})
    bandwidth: dict = field(default_factory=lambda: {"intra": 400e9, "inter": 50e9})
    """Ring algorithm bytes per second per rank, within a node and across nodes."""
    collective_table: list = field(default_factory=list)
    """Measured [ring bytes, seconds] of one collective on this host, ascending; empty: latency + bandwidth."""
    efficiency_one_thread: float = 0.0
    """CPU only: the step's efficiency against the one-thread rate, measured with one rank per core."""
    zero_overhead_s_per_param: dict = field(default_factory=dict)
    """Per ZeRO stage ("1"-"3"): DeepSpeed's step time beyond megalm's engine at the same dp, per parameter."""
    tp_in_step_factor: float = 1.0
    """Tensor-parallel collectives inside a training step against the same all-reduces measured alone."""
    optimizer_s_per_param_busy: float = 0.0
    """CPU only: the optimizer's seconds per parameter of a one-thread rank, measured with one rank per core."""
    source: str = "defaults"

    def collective_seconds(self, ring_bytes: float, within_node: bool) -> float:
        """One collective moving ``ring_bytes`` per rank (ring model)."""
        where = "intra" if within_node else "inter"
        table = self.collective_table
        if not table or not within_node:
            return self.latency_s[where] + ring_bytes / self.bandwidth[where]
        if ring_bytes <= table[0][0]:
            return table[0][1]
        for (b0, t0), (b1, t1) in zip(table, table[1:]):
            if ring_bytes <= b1:
                return t0 + (t1 - t0) * (ring_bytes - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = table[-2], table[-1]
        return t1 + (ring_bytes - b1) * (t1 - t0) / (b1 - b0)

    def compute_rate(self, ranks_per_node: int, busy: float = 1.0) -> float:
        """FLOP/s one rank's compute reaches when ``ranks_per_node`` ranks share a host, each computing the
        fraction ``busy`` of the time (a pipeline stage idles in the bubble, leaving its core to the others)."""
        if self.device != "cpu" or ranks_per_node <= 1:
            return self.matmul_flops * self.efficiency
        share = min(1.0, self.cores / (ranks_per_node * busy)) if self.cores else 1.0
        return self.matmul_flops_one_thread * share * (self.efficiency_one_thread or self.efficiency)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Machine":
        return cls(**json.loads(Path(path).read_text()))
