"""Pipeline parallelism: layer partitioning (stage.py), point-to-point messages (p2p.py) and the GPipe,
1F1B and interleaved 1F1B schedules (schedules.py); ``megalm bench bubble`` measures their bubbles."""
from .p2p import P2P, activation_shape
from .schedules import SCHEDULES, ScheduleStats, autograd_backward_step, gpipe, interleaved_1f1b, one_f_one_b
from .stage import partition_layers, sum_tied_gradients

__all__ = [
    "P2P", "activation_shape", "SCHEDULES", "ScheduleStats", "autograd_backward_step", "gpipe",
    "interleaved_1f1b", "one_f_one_b", "partition_layers", "sum_tied_gradients",
]
