"""The kernel interface: attention and normalisation, chosen once when the model is built.

``torch`` is the reference path (SDPA, F.layer_norm, an fp32 RMSNorm); ``triton`` uses the fused kernels in
``megalm.kernels``; ``auto`` picks Triton on CUDA and the reference elsewhere. The model calls only
``Ops.attention`` and ``Ops.norm``, so kernels drop in without touching model code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def torch_attention(q, k, v, causal: bool = True, dropout_p: float = 0.0):
    """q: (B, Hq, T, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv (grouped-query attention).

    With a KV cache Tk > T: the queries are the last T positions, so the causal mask is offset (bottom-right).
    """
    T, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
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


@dataclass
class Ops:
    attention_impl: str
    norm_impl: str
    _attention: Callable
    _layer_norm: Callable
    _rms_norm: Callable

    def attention(self, q, k, v, causal: bool = True, dropout_p: float = 0.0):
        if dropout_p > 0.0 or q.shape[2] != k.shape[2]:
            # The fused kernel has no dropout and no cache offset: both go to the reference.
            return torch_attention(q, k, v, causal, dropout_p)
        return self._attention(q, k, v, causal)

    def norm(self, kind: str, x, weight, bias: Optional[torch.Tensor], eps: float):
        if kind == "rmsnorm":
            return self._rms_norm(x, weight, eps)
        return self._layer_norm(x, weight, bias, eps)


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


def build_ops(attention: str = "auto", norm: str = "auto", device: torch.device = torch.device("cpu")) -> Ops:
    """Resolve the kernel choice once, at model build."""
    attn_fn, ln_fn, rms_fn = (lambda q, k, v, c: torch_attention(q, k, v, c)), torch_layer_norm, torch_rms_norm
    use_attn, use_norm = _use_triton(attention, device, "attention"), _use_triton(norm, device, "norm")
    if use_attn:
        from megalm.kernels.attention import flash_attention

        attn_fn = lambda q, k, v, c: flash_attention(q, k, v, causal=c)  # noqa: E731
    if use_norm:
        from megalm.kernels.norm import layer_norm, rms_norm

        ln_fn, rms_fn = layer_norm, rms_norm
    return Ops("triton" if use_attn else "torch", "triton" if use_norm else "torch", attn_fn, ln_fn, rms_fn)
