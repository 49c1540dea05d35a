"""The interface the pipeline schedules, the training loop, checkpointing and the benchmarks talk to.

Two engines implement it: ``NativeEngine`` (megalm's own optimizer, data-parallel all-reduce and loss scaling)
and ``DeepSpeedEngine`` (ZeRO 0-3). ``ForwardEngine`` is the forward half alone, for evaluation and generation.
Nothing outside ``megalm.engine`` knows which one runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator

import torch

from megalm.engine.precision import autocast_for

# (layout-free name, this rank's tensor, its ShardSpec): what ``state_tensors`` yields and checkpoints store
StateTensor = tuple[str, torch.Tensor, object]
# read(name, shard_spec, local_shape, optional=False) -> this rank's slice of a stored tensor (None if optional
# and absent)
Reader = Callable[..., "torch.Tensor | None"]


class Engine(ABC):
    """One rank's model chunks, their optimizer and the data-parallel reduction."""

    chunks: list
    topo: object
    """The rank's ``Topology``."""
    activation_dtype: torch.dtype = torch.float32
    """The dtype of the messages between pipeline stages (the precision policy: ``megalm.engine.precision``)."""
    phases = None
    """A ``megalm.runtime.phases.PhaseClock`` timing ``step`` (data-parallel reduction, optimizer); None: off."""

    @abstractmethod
    def forward(self, chunk: int, x, targets=None, segments=None):
        """Run model chunk ``chunk``: activations (or, on the last stage with targets, the mean loss);
        ``segments``: each position's document in a packed sequence."""

    @abstractmethod
    def backward(self, chunk: int, output, output_grad=None) -> None:
        """Backpropagate the loss (last stage; already divided by the micro-batch count) or ``output`` with the
        gradient received from the next stage."""

    @abstractmethod
    def step(self, lr: float) -> float:
        """Tied-embedding sum, data-parallel reduction, clipping, update, zeroing. Returns the global gradient norm
        before clipping (inf for an fp16 step skipped on overflow). A non-finite norm outside fp16's loss scaling
        means a NaN or inf gradient on some rank: no optimizer step was taken, on any rank."""

    def discard_gradients(self) -> None:
        """Drop this step's gradients without an optimizer step (train.on_non_finite=skip)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop a step's gradients")

    @abstractmethod
    def state_tensors(self, with_optimizer: bool = True, trainable_only: bool = False) -> Iterator[StateTensor]:
        """fp32 weights and optimizer state under layout-free names. Collective under ZeRO: every rank runs it to
        the end; the caller keeps what its rank writes. ``trainable_only``: the parameters that train (a LoRA
        run's adapters), not the frozen ones."""

    @abstractmethod
    def load_state_tensors(self, read: Reader, step_count: int, with_optimizer: bool = True) -> None:
        """Fill weights (and optimizer state) from ``read``."""

    @abstractmethod
    def optimizer_step_count(self) -> int:
        """Optimizer steps taken so far (0 before the first)."""

    @abstractmethod
    def model_states(self) -> dict[str, list]:
        """This rank's tensors holding each model state: "params", "grads", "master", "moments", "buffers"
        (what the memory benchmark measures)."""

    def reduce_bucket_elements(self) -> int:
        """Elements of the gradient-reduction bucket the engine keeps besides the model states (0: none, as the
        native engine all-reduces one flat copy of the gradients)."""
        return 0

    def parameter_count(self) -> int:
        """Elements of this rank's parameters (its tensor-parallel slices, also when ZeRO-3 partitions them)."""
        return sum(getattr(p, "ds_numel", p.numel()) for chunk in self.chunks for p in chunk.parameters())

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current loss scale; None in other precisions."""
        return None

    def loss_scale_state(self) -> dict | None:
        return None

    def load_loss_scale_state(self, state: dict | None) -> None:
        return None

    def save_native_checkpoint(self, folder, tag: str) -> None:
        """The engine's own checkpoint format beside megalm's (DeepSpeed only)."""
        raise NotImplementedError(f"{type(self).__name__} has no checkpoint format of its own")


class ForwardEngine:
    """The forward half of an engine (no optimizer): enough for evaluation and generation."""

    activation_dtype = torch.float32

    def __init__(self, chunks, precision: str, device: torch.device):
        self.chunks, self.precision, self.device = chunks, precision, device

    def forward(self, chunk: int, x, targets=None, **kwargs):
        with autocast_for(self.precision, self.device):
            return self.chunks[chunk](x, targets, **kwargs)
