"""Shared fixtures: a tiny preprocessed corpus (a few standard-library files) and small configs."""
import os
import sysconfig
from pathlib import Path

import pytest

from megalm.config.rules import check_pipeline_layers, check_schedule

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before anything imports megalm.kernels.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# MEGALM_STRESS=1 runs the stress trials and the variants the everyday suite leaves out (the README's figures)
STRESS = os.environ.get("MEGALM_STRESS") == "1"
STDLIB_FILES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "heapq.py", "keyword.py",
                "opcode.py", "queue.py", "shlex.py", "string.py", "textwrap.py", "this.py", "types.py"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """PREFIX of a dataset preprocessed from 14 standard-library files with a 512-token BPE."""
    from megalm.data.preprocess import preprocess

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    preprocess([str(stdlib / f) for f in STDLIB_FILES], str(out), vocab_size=512, workers=1, show_progress=False)
    return str(out)


def tiny_overrides(prefix: str, run_dir, **extra) -> list[str]:
    """A 2-layer model that trains a step in well under a second on one CPU core."""
    base = {
        "data.prefix": prefix, "data.seq_len": 32, "model.max_seq_len": 32, "model.hidden_size": 32,
        "model.num_layers": 2, "model.num_heads": 4, "model.ffn_hidden_size": 64,
        "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.steps": 6, "train.run_dir": str(run_dir),
        "train.eval_interval": 0, "train.eval_samples": 8, "train.log_interval": 100, "checkpoint.interval": 0,
        "logging.plot": "false", "logging.tensorboard": "false", "lr.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def validate_pipeline(num_layers, pp, virtual_stages, num_microbatches, explicit=None, schedule=None):
    """The rule book's pipeline rules, as the run applies them: the partition, then the schedule's own."""
    check_pipeline_layers(num_layers, pp, virtual_stages, explicit)
    check_schedule(schedule or ("interleaved" if virtual_stages > 1 else "1f1b"), pp, virtual_stages,
                   num_microbatches)


def load_masters(module, masters: dict) -> None:
    """Copy each parameter's slice of the full tensor ``masters[name]`` (names as in named_parameters, e.g. the
    state dict of the same model at tp=1); parameters without a ShardSpec are taken whole."""
    import torch

    from megalm.parallel.shard import spec_of

    with torch.no_grad():
        for name, p in module.named_parameters():
            local = spec_of(p).take(masters[name].to(device=p.device, dtype=p.dtype))
            assert local.shape == p.shape, (name, tuple(local.shape), tuple(p.shape))
            p.copy_(local)
