"""Fused Triton kernels, each beside its PyTorch reference. Imported as ``megalm.kernels``."""
