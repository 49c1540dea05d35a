"""Every Triton kernel compiles for sm_90 (H100/H200) with the tile configurations its GPU path launches, on a
machine without a GPU: Triton's front end, passes and bundled ptxas need no driver. This catches what the
interpreter forgives (types that differ between the branches of a runtime ``if``, failed lowerings) and tiles
over the shared-memory budget, before the first GPU run. Runs in subprocesses without TRITON_INTERPRET."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="needs triton")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    out = subprocess.run([sys.executable, "-m", "megalm.kernels.compile_check", "--arch", "90", "--quick"],
                         env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = out.stdout.strip().splitlines()[-1]
    compiled, total = summary.split(": ")[1].split(" kernel")[0].split(" of ")
    assert compiled == total and int(total) >= 40, summary
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_norm_fwd_kernel",
                   "_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_ce_fwd_bwd_kernel"):
        assert kernel in out.stdout


def test_a_kernel_the_interpreter_accepts_but_the_compiler_refuses_is_reported(tmp_path):
    """A variable that is a constexpr before a runtime ``if`` and a tensor inside it runs under the
    interpreter, but is a compile error; the check reports it as a failed configuration."""
    (tmp_path / "badkernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad_kernel(X, n):
            end = 0
            if n > 4:
                end = tl.load(X)
            tl.store(X, end)
    """))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from megalm.kernels.compile_check import _compile_one
        row = _compile_one(("badkernel", "bad_kernel", {{"X": "*fp32", "n": "i32"}}, {{}}, {{}}, {{}}, 90))
        print("OK" if row["ok"] else "FAILED " + row["error"])
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("FAILED"), out.stdout


def test_launches_are_specialised_as_the_jit_would():
    """Aligned pointers and strides divisible by 16 carry tt.divisibility, as on a GPU: without it the compiler
    emits scalar loads and no async copies, and the shared memory it reports is a fraction of the real one."""
    script = textwrap.dedent("""
        import torch
        from megalm.kernels import attention
        from megalm.kernels.compile_check import _specialized, captured_launches
        with captured_launches() as calls, torch.no_grad():
            q = torch.empty(1, 4, 256, 128, dtype=torch.bfloat16)
            attention._attn_forward(q, q, q, True, 0.1)
        fn, args, kwargs = calls[0]
        signature, constexprs, attrs, options = _specialized(fn, args, kwargs, 90)
        names = list(signature)
        marked = sorted(names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v)
        print(" ".join(marked), options["num_warps"])
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    marked = out.stdout.split()
    assert {"Q", "K", "V", "O", "LSE", "sqt", "skt", "D"} <= set(marked[:-1]), out.stdout
