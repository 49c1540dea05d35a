"""A planted NaN (MEGALM_FAULTS nan): skip drops the step on every rank, rollback reloads the latest checkpoint
and skips the data up to the bad step, and no checkpoint holding NaN is ever committed; loss spikes are flagged."""
from __future__ import annotations

import pytest
import torch

from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import ConfigError, load_config
from megalm.runtime import faults
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


@pytest.fixture
def plant(monkeypatch):
    def plant_fault(text):
        monkeypatch.setenv("MEGALM_FAULTS", text)
        monkeypatch.setattr(faults, "_planned", None)
    yield plant_fault
    faults._planned = None


def _run(corpus, run_dir, **extra):
    return train(load_config(None, tiny_overrides(corpus, run_dir, **{"train.steps": 4, **extra})))


def _weights(folder):
    reader = CheckpointReader(folder)
    return {n: reader.read(n) for n in reader.manifest["tensors"] if n.startswith("model.")}


def test_skip_leaves_the_weights_of_a_run_that_never_took_the_step(tiny_corpus, tmp_path, plant, capsys):
    plant("nan:step=3")
    _run(tiny_corpus, tmp_path / "skip", **{"train.on_non_finite": "skip", "train.stop_at_step": 3})
    assert "non-finite loss nan on some rank; every rank dropped its gradients" in capsys.readouterr().out
    plant("")
    _run(tiny_corpus, tmp_path / "ref", **{"train.stop_at_step": 2})
    skipped, ref = latest_checkpoint(tmp_path / "skip"), latest_checkpoint(tmp_path / "ref")
    assert skipped.name == "step_0000003" and ref.name == "step_0000002"
    a, b = _weights(skipped), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert CheckpointReader(skipped).manifest["optimizer"]["step"] == 2        # no optimizer step was taken
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if r.get("skipped_non_finite")] == [3]


def test_a_nan_gradient_with_a_finite_loss_is_skipped_like_a_nan_loss(tiny_corpus, tmp_path, plant, capsys):
    plant("nan_grad:step=3")
    _run(tiny_corpus, tmp_path / "skip", **{"train.on_non_finite": "skip", "train.stop_at_step": 3})
    assert "step 3: non-finite gradient (the loss was finite) on some rank; every rank dropped its gradients" \
        in capsys.readouterr().out
    plant("")
    _run(tiny_corpus, tmp_path / "ref", **{"train.stop_at_step": 2})
    a, b = _weights(latest_checkpoint(tmp_path / "skip")), _weights(latest_checkpoint(tmp_path / "ref"))
    assert all(torch.equal(a[n], b[n]) for n in a)                              # step 3 changed nothing
    skipped = [r for r in read_metrics(tmp_path / "skip") if r.get("skipped_non_finite")]
    assert [r["step"] for r in skipped] == [3]
    assert all(r["loss"] == r["loss"] for r in read_metrics(tmp_path / "skip") if "loss" in r)   # losses finite


@pytest.mark.parametrize("engine", ["native", "deepspeed"])
def test_a_nan_gradient_stops_before_the_optimizer_step(tiny_corpus, tmp_path, plant, engine):
    """By default (stop), under either engine: the step is not taken and the run ends with the reason (DeepSpeed at
    ZeRO-0 in fp32, whose plain torch optimizer would otherwise step with the NaN)."""
    from megalm.train.step import NonFiniteLoss

    plant("nan_grad:step=3")
    extra = {"parallel.engine": engine, "checkpoint.interval": 2, "train.steps": 4}
    if engine == "deepspeed":
        extra.update({"parallel.zero_stage": 0, "train.precision": "fp32"})
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient \(norm nan\) at step 3 with a finite loss.*no "
                                            r"optimizer step was taken on any rank"):
        _run(tiny_corpus, tmp_path / "stop", **extra)
    latest = latest_checkpoint(tmp_path / "stop")
    assert latest.name == "step_0000002"
    assert all(bool(torch.isfinite(t).all()) for t in _weights(latest).values())


@pytest.mark.parametrize("engine,stage,precision", [("native", 0, "fp32"), ("deepspeed", 0, "fp32"),
                                                    ("deepspeed", 2, "bf16")])
def test_the_engine_takes_no_step_on_a_nan_gradient(tiny_corpus, tmp_path, engine, stage, precision):
    """The engine itself, one process: after a backward whose gradients are NaN (the loss finite), ``step``
    returns a non-finite norm and every fp32 master weight is bit-unchanged. DeepSpeed 0.19's ZeRO optimizers skip
    such a step themselves, but at ZeRO-0 in fp32 (a plain torch optimizer) it would step with the NaN: megalm
    checks before DeepSpeed's step in every case."""
    from megalm.config import resolve
    from megalm.engine import build_engine
    from megalm.parallel.topology import build_topology

    extra = {"parallel.engine": engine, "model.vocab_size": 512, "train.micro_batch_size": 2,
             "train.global_batch_size": 2}                       # one backward per step
    if engine == "deepspeed":
        extra.update({"parallel.zero_stage": stage, "train.precision": precision})
    cfg = resolve(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **extra)), 1)
    model = build_engine(cfg, build_topology(), torch.device("cpu"))
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))

    def backward(poisoned: bool):
        loss = model.forward(0, tokens[:, :-1], tokens[:, 1:])
        if poisoned:
            loss.register_hook(lambda grad: grad * float("nan"))
        model.backward(0, loss)
    backward(False)
    assert torch.isfinite(torch.tensor(model.step(1e-2)))
    before = {name: t.clone() for name, t, _ in model.state_tensors(with_optimizer=False)}
    backward(True)
    assert not torch.isfinite(torch.tensor(model.step(1e-2)))
    after = {name: t for name, t, _ in model.state_tensors(with_optimizer=False)}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_rollback_reloads_the_checkpoint_and_skips_the_data_up_to_the_bad_step(tiny_corpus, tmp_path, plant,
                                                                                capsys):
    plant("nan:step=4")
    run = tmp_path / "rollback"
    extra = {"train.steps": 6, "checkpoint.interval": 2, "train.on_non_finite": "rollback", "checkpoint.keep": 5}
    _run(tiny_corpus, run, **extra, **{"train.stop_at_step": 4})
    out = capsys.readouterr().out
    assert "rolled back to the checkpoint of step 2 and skipped the data of steps 3-4" in out
    step4, step2 = run / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000002"
    a, b = _weights(step4), _weights(step2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert CheckpointReader(step4).manifest["data"]["consumed_samples"] == 4 * 4      # past the skipped data
    plant("")
    _run(tiny_corpus, run, **extra)                                   # resumes and finishes
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 5, 6]
    assert [r["rolled_back_to"] for r in read_metrics(run) if "rolled_back_to" in r] == [2]


def test_rollback_without_a_checkpoint_stops(tiny_corpus, tmp_path, plant):
    plant("nan:step=2")
    with pytest.raises(RuntimeError, match="no checkpoint to roll back to"):
        _run(tiny_corpus, tmp_path / "r", **{"train.on_non_finite": "rollback"})


def test_no_checkpoint_holding_nan_is_committed(tiny_corpus, tmp_path):
    from megalm.checkpoint.manifest import new_manifest
    from megalm.checkpoint.save import save_checkpoint
    from megalm.parallel.shard import ShardSpec
    good = tmp_path / "run"
    _run(tiny_corpus, good, **{"train.steps": 2})
    before = latest_checkpoint(good)
    manifest = new_manifest(3, {}, {}, None, 0, "adamw", 3, False)
    spec = ShardSpec(None)
    with pytest.raises(CheckpointError, match=r"model.w holds NaN or inf on rank 0.*previous checkpoint stays"):
        save_checkpoint(good, 3, [("model.w", torch.tensor([1.0, float("nan")]), spec)], manifest)
    assert latest_checkpoint(good) == before


def test_skip_and_rollback_need_the_native_engine():
    with pytest.raises(ConfigError, match="needs megalm's native engine"):
        from megalm.config.rules import validate
        validate(load_config(None, ["train.on_non_finite=skip", "parallel.zero_stage=1"]), 1, cuda=False)


def test_a_loss_spike_is_flagged(tiny_corpus, tmp_path, capsys):
    # a factor below 1 flags every step whose loss is above a fraction of the median: the mechanism, made visible
    run = tmp_path / "spike"
    _run(tiny_corpus, run, **{"train.steps": 6, "train.loss_spike_factor": 0.5, "train.loss_spike_window": 2})
    flagged = [r for r in read_metrics(run) if "loss_spike" in r]
    assert [r["step"] for r in flagged] == [3, 4, 5, 6] and all(r["loss_spike"] > 0.5 for r in flagged)
    assert "loss spike:" in capsys.readouterr().out
    quiet = tmp_path / "quiet"
    _run(tiny_corpus, quiet, **{"train.steps": 6})                     # the default factor 3: no flags
    assert not [r for r in read_metrics(quiet) if "loss_spike" in r]


def _train_rank(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nan", "nan_grad"])
def test_a_nan_on_one_rank_is_skipped_on_every_rank(tiny_corpus, tmp_path, monkeypatch, fault):
    """dp 2, the NaN (in the loss, or in the gradients only) planted on rank 1 only: both ranks skip step 3, and
    the weights equal a run without it."""
    from megalm.runtime.spawn import run_distributed
    monkeypatch.setenv("MEGALM_FAULTS", f"{fault}:rank=1,step=3")
    extra = {"train.steps": 4, "train.on_non_finite": "skip", "train.stop_at_step": 3, "parallel.dp": 2}
    run_distributed(_train_rank, 2, tiny_overrides(tiny_corpus, tmp_path / "skip", **extra))
    monkeypatch.setenv("MEGALM_FAULTS", "")
    run_distributed(_train_rank, 2, tiny_overrides(tiny_corpus, tmp_path / "ref", **{**extra, "train.stop_at_step": 2}))
    a, b = _weights(latest_checkpoint(tmp_path / "skip")), _weights(latest_checkpoint(tmp_path / "ref"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if r.get("skipped_non_finite")] == [3]
