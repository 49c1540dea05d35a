"""The kernel interface: attention, normalisation, RoPE, SwiGLU and the head's loss, chosen once when the model
is built.

``torch`` is the reference path (SDPA, F.layer_norm, an fp32 RMSNorm, plain RoPE/SwiGLU, full logits then cross
entropy); ``triton`` uses the fused kernels in ``megalm.kernels``; ``auto`` picks Triton on CUDA and the
reference elsewhere. The model calls only ``Ops`` methods, so kernels drop in without touching model code.
The fused linear + cross entropy serves tp = 1 only: under tensor parallelism the vocabulary-parallel loss
already keeps each rank to its slice of the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megalm.model.documents import Documents


def torch_attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, mask=None):
    """q: (B, Hq, T, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv (grouped-query attention).

    With a KV cache Tk > T: the queries are the last T positions, so the causal mask is offset (bottom-right).
    ``mask`` (B, 1, T, T) boolean, True where a query may attend: packed documents (it includes causality);
    or ``Documents``.
    """
    if isinstance(mask, Documents):
        mask = mask.dense()
    T, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if not causal or T == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, dropout_p=dropout_p,
                                              enable_gqa=gqa)
    mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def torch_rms_norm(x, weight, eps: float):
    # Statistics in fp32 whatever the input dtype, as Llama does; the result is cast back.
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def torch_layer_norm(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_rope(x, cos, sin):
    """Rotary embedding, "rotate half" convention: x (B, H, T, D), cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def torch_swiglu(gate, up):
    return F.silu(gate) * up


def torch_linear_cross_entropy(h, weight, targets, ignore_index: int = -100):
    """Mean cross entropy of the logits h @ weight^T over the targets that are not ``ignore_index``, h (N, H),
    targets (N,): full logits, softmax in fp32. No target at all gives 0 (not NaN), as the fused kernel does."""
    total = F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


@dataclass
class Ops:
    """The resolved kernel choice: ``impls`` names the path of each op ("triton" or "torch")."""

    impls: dict
    _attention: Callable
    _layer_norm: Callable
    _rms_norm: Callable
    rope: Callable
    swiglu: Callable
    _linear_cross_entropy: Callable

    def attention(self, q, k, v, causal: bool = True, dropout_p: float = 0.0, mask=None):
        """``mask``: None, or the packed ``Documents`` (the Triton kernel takes their segment ids)."""
        if dropout_p > 0.0 or q.shape[2] != k.shape[2] or (mask is not None and not isinstance(mask, Documents)):
            # The fused kernel has no dropout, no cache offset and no dense mask: they go to the reference.
            return torch_attention(q, k, v, causal, dropout_p, mask)
        return self._attention(q, k, v, causal, mask)

    def norm(self, kind: str, x, weight, bias: Optional[torch.Tensor], eps: float):
        if kind == "rmsnorm":
            return self._rms_norm(x, weight, eps)
        return self._layer_norm(x, weight, bias, eps)

    def linear_cross_entropy(self, h, weight, targets):
        """Mean loss of (B, T, H) hidden states against (B, T) targets through the full head (tp = 1 only)."""
        return self._linear_cross_entropy(h.flatten(0, -2), weight, targets.flatten())


def _use_triton(choice: str, device: torch.device, what: str) -> bool:
    from megalm.kernels.utils import triton_available

    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"kernels.{what}=triton but Triton cannot run here (no CUDA and TRITON_INTERPRET "
                               f"is not 1); use kernels.{what}=auto or torch")
        return True
    return device.type == "cuda" and triton_available()


def build_ops(attention: str = "auto", norm: str = "auto", device: torch.device = torch.device("cpu"),
              rope: str = "auto", swiglu: str = "auto", cross_entropy: str = "auto") -> Ops:
    """Resolve the kernel choice once, at model build: ``auto`` is Triton on CUDA, PyTorch elsewhere."""
    choices = dict(attention=attention, norm=norm, rope=rope, swiglu=swiglu, cross_entropy=cross_entropy)
    impls = {what: "triton" if _use_triton(choice, device, what) else "torch" for what, choice in choices.items()}
    # _attention(q, k, v, causal, documents): documents None or the packed Documents
    ops = dict(_attention=lambda q, k, v, c, documents: torch_attention(q, k, v, c, mask=documents),
               _layer_norm=torch_layer_norm,
               _rms_norm=torch_rms_norm, rope=torch_rope, swiglu=torch_swiglu,
               _linear_cross_entropy=torch_linear_cross_entropy)
    if impls["attention"] == "triton":
        from megalm.kernels.attention import flash_attention

        ops["_attention"] = lambda q, k, v, c, documents: flash_attention(
            q, k, v, causal=c, segments=None if documents is None else documents.segments)
    if impls["norm"] == "triton":
        from megalm.kernels.norm import layer_norm, rms_norm

        ops["_layer_norm"], ops["_rms_norm"] = layer_norm, rms_norm
    if impls["rope"] == "triton":
        from megalm.kernels.rope import apply_rope

        ops["rope"] = apply_rope
    if impls["swiglu"] == "triton":
        from megalm.kernels.swiglu import swiglu as fused_swiglu

        ops["swiglu"] = fused_swiglu
    if impls["cross_entropy"] == "triton":
        from megalm.kernels.cross_entropy import linear_cross_entropy

        ops["_linear_cross_entropy"] = linear_cross_entropy
    return Ops(impls, **ops)


def reference_ops() -> Ops:
    """Every op on its PyTorch path, whatever the device (conversion, verification, planning)."""
    return build_ops("torch", "torch", rope="torch", swiglu="torch", cross_entropy="torch")
