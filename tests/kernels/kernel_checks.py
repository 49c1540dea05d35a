"""Shared checks of the kernel tests: compare a kernel with its reference in fp32 and low precision."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close_to_ref(out, ref32, ref_lp, atol, rtol, what=""):
    """flash-attention's criterion: the kernel's error against the fp32 reference is at most twice PyTorch's
    own error in the same low precision, plus atol + rtol * max|ref|."""
    err, pt_err = max_err(out, ref32), max_err(ref_lp, ref32)
    bound = 2 * pt_err + atol + rtol * ref32.abs().max().item()
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {pt_err:.3e})"


def check_fwd_bwd(fn, ref, inputs, atol, rtol, grad_idx=None, seed=0):
    """Run fn and ref on `inputs` (low precision), ref on fp32 copies; compare the output and the gradients
    of the floating-point inputs listed in grad_idx (all floating inputs by default)."""
    torch.manual_seed(seed)
    grad_idx = grad_idx if grad_idx is not None else [i for i, t in enumerate(inputs)
                                                       if torch.is_tensor(t) and t.is_floating_point()]
    def leaves(cast):
        return [cast(t).requires_grad_(i in grad_idx) if torch.is_tensor(t) and t.is_floating_point() else t
                for i, t in enumerate(inputs)]

    lp, k_in = leaves(lambda t: t.detach().clone()), leaves(lambda t: t.detach().clone())
    f32 = leaves(lambda t: t.detach().float())
    out = fn(*k_in)
    dout = torch.randn_like(out)
    out_lp, out32 = ref(*lp), ref(*f32)
    assert out.dtype == out_lp.dtype and out.shape == out_lp.shape
    assert_close_to_ref(out, out32, out_lp, atol, rtol, "output")
    if out.dim() == 0:
        dout = torch.ones_like(out)
    grads = torch.autograd.grad(out, [k_in[i] for i in grad_idx], dout)
    grads_lp = torch.autograd.grad(out_lp, [lp[i] for i in grad_idx], dout)
    grads32 = torch.autograd.grad(out32, [f32[i] for i in grad_idx], dout.float())
    for i, g, g_lp, g32 in zip(grad_idx, grads, grads_lp, grads32):
        assert g.dtype == inputs[i].dtype
        assert_close_to_ref(g, g32, g_lp, atol, rtol, f"grad of input {i}")
    return out, grads
