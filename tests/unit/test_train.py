"""Single-process training: loss falls, resume is exact, checkpoints refuse damage, eval and generate work."""
import subprocess
import sys

import pytest

from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.config import ConfigError, load_config
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


def run(prefix, run_dir, **extra):
    return train(load_config(None, tiny_overrides(prefix, run_dir, **extra)))


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_loss_falls(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 60, "optimizer.lr": 1e-2, "lr.warmup_steps": 5})
    curve = losses(tmp_path)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(56, 61)) / 5
    assert last < first - 0.5, (first, last)      # uniform guessing is ln(512) = 6.24
    records = read_metrics(tmp_path)
    assert any("val_ppl" in r for r in records) and any("test_ppl" in r for r in records)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])


def test_resume_equals_uninterrupted_run(tiny_corpus, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = {"train.steps": 8, "train.eval_interval": 5}
    run(tiny_corpus, straight, **extra)
    run(tiny_corpus, resumed, **extra, **{"train.stop_at_step": 5})
    assert latest_checkpoint(resumed).name == "step_0000005"
    capsys.readouterr()
    run(tiny_corpus, resumed, **extra)
    assert "resuming from" in capsys.readouterr().out
    a, b = read_metrics(straight), read_metrics(resumed)
    steps = [r["step"] for r in b if "loss" in r]
    assert steps == list(range(1, 9)), steps      # steps 1-5, then 6-8: nothing was trained twice
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]   # the same floats
    # the evaluation due at the stop step ran before stopping, exactly as in the uninterrupted run
    assert [(r["step"], r["val_loss"]) for r in a if "val_loss" in r] == \
        [(r["step"], r["val_loss"]) for r in b if "val_loss" in r]
    assert [r["step"] for r in b if "val_loss" in r] == [5, 8]


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    import megalm.train.step as step_module

    real, calls = step_module._callbacks, []

    def planted(engine, p2p, micro_batches, poison="", phases=None):   # micro-batch 1 of step 3 is NaN
        forward, backward = real(engine, p2p, micro_batches, poison, phases)

        def forward_with_nan(chunk, i, x):
            out = forward(chunk, i, x)
            calls.append(i)
            return out * float("nan") if len(calls) == 6 else out
        return forward_with_nan, backward

    monkeypatch.setattr(step_module, "_callbacks", planted)
    with pytest.raises(step_module.NonFiniteLoss) as err:
        run(tiny_corpus, tmp_path, **{"train.steps": 4, "checkpoint.interval": 2})
    message = str(err.value)
    assert "at step 3" in message and "micro-batch(es) [1]" in message and "before the optimizer step" in message
    assert "train in fp32" not in message                         # the run already is fp32
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2]
    from megalm.checkpoint.load import CheckpointReader

    assert latest_checkpoint(tmp_path).name == "step_0000002"
    CheckpointReader(latest_checkpoint(tmp_path))                 # intact


def test_tensorboard_events_carry_the_logged_scalars(tiny_corpus, tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard (pip install megalm[test])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_corpus, tmp_path, **{"train.steps": 3, "logging.tensorboard": "true"})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses_logged = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if "loss" in r]
    assert [s for s, _ in losses_logged] == [1, 2, 3]
    assert [v for _, v in losses_logged] == pytest.approx([v for _, v in expected], rel=1e-6)   # stored as fp32
    assert {"lr", "grad_norm", "val_loss", "test_ppl"} <= set(events.Tags()["scalars"])


def test_loss_curve_plot_is_written(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 3, "logging.plot": "true"})
    png = tmp_path / "loss_curve.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_damaged_checkpoint_is_refused_and_previous_loads(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3})
    newest = latest_checkpoint(tmp_path)
    shard = next(newest.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from megalm.checkpoint.load import CheckpointReader

    with pytest.raises(CheckpointError, match="sha256"):
        CheckpointReader(newest)
    shard.write_bytes(bytes(data[: len(data) // 3]))                  # truncated
    with pytest.raises(CheckpointError, match="sha256"):
        CheckpointReader(newest)
    (newest / "COMMITTED").unlink()                                   # an unfinished save is skipped
    previous = latest_checkpoint(tmp_path)
    assert previous is not None and previous != newest
    CheckpointReader(previous)                                        # still loads


def test_resume_refuses_another_model(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    with pytest.raises(ConfigError, match="hidden_size"):
        run(tiny_corpus, tmp_path, **{"train.steps": 4, "model.hidden_size": 64})


def test_token_beyond_vocabulary_is_refused(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        run(tiny_corpus, tmp_path, **{"model.vocab_size": 256})


def test_eval_and_generate_cli(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 3})
    cmd = [sys.executable, "-m", "megalm"]
    out = subprocess.run(cmd + ["eval", "--checkpoint", str(tmp_path), "--samples", "8"], capture_output=True,
                         text=True, check=True).stdout
    assert "perplexity" in out
    gen = [cmd + ["generate", "--checkpoint", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "12",
                  "--seed", "3"] for _ in range(2)]
    texts = [subprocess.run(c, capture_output=True, text=True, check=True).stdout for c in gen]
    assert texts[0] == texts[1] and texts[0].startswith("def ")
    other = subprocess.run(gen[0][:-1] + ["4"], capture_output=True, text=True, check=True).stdout
    assert other.startswith("def ")


def test_eval_scores_a_dataset_or_a_text_file_but_not_both(tiny_corpus, tmp_path):
    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    cmd = [sys.executable, "-m", "megalm", "eval", "--checkpoint", str(tmp_path), "--samples", "4"]
    on_data = subprocess.run(cmd + ["--data", tiny_corpus, "--split", "valid"], capture_output=True, text=True,
                             check=True).stdout
    text = tmp_path / "sample.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    on_text = subprocess.run(cmd + ["--text", str(text)], capture_output=True, text=True, check=True).stdout
    assert "perplexity" in on_data and "perplexity" in on_text
    both = subprocess.run(cmd + ["--data", tiny_corpus, "--text", str(text)], capture_output=True, text=True)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_cli_reports_bad_config_without_traceback(tiny_corpus, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megalm", "train", "--config", "configs/tiny.yaml",
                           f"data.prefix={tiny_corpus}", f"train.run_dir={tmp_path}", "model.num_heads=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_heads=3" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_refuses_bad_arguments_and_says_why_it_stopped(tiny_corpus, tmp_path, capsys):
    from megalm.cli import main

    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    base = ["generate", "--checkpoint", str(tmp_path), "--seed", "1"]
    for extra, needle in [(["--temperature", "-1"], "--temperature=-1.0 is out of range"),
                          (["--top-p", "1.5"], "--top-p=1.5 is out of range"),
                          (["--top-k", "-3"], "--top-k=-3 is out of range"),
                          (["--max-new-tokens", "-1"], "--max-new-tokens=-1 is out of range"),
                          (["--prompt", ""], "--prompt is empty"),
                          (["--prompt", "x = 1\n" * 40], "leaves no room to generate; shorten it")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    # max_seq_len is 32: a prompt of 26-30 tokens leaves a few positions; asking for 50 stops there and says so
    from megalm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(f"{tiny_corpus}.tokenizer.json")
    prompt = next(p for p in ("x = 1\n" * n for n in range(1, 40)) if len(tokenizer.encode(p)) >= 26)
    assert len(tokenizer.encode(prompt)) < 31
    assert main(base + ["--prompt", prompt, "--max-new-tokens", "50", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "stopped after" in err and "at model.max_seq_len=32" in err, err


def test_rerunning_a_finished_run_adds_no_rows(tiny_corpus, tmp_path, capsys):
    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    rows = read_metrics(tmp_path)
    capsys.readouterr()
    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    assert read_metrics(tmp_path) == rows
    out = capsys.readouterr().out
    assert "run already finished: not recorded again" in out and "(8 samples of the test split" in out


def test_the_log_shows_tflops_and_mfu_from_the_flop_counter(tiny_corpus, tmp_path, capsys):
    from megalm.flops import flops_per_token

    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path))
    cfg.model.vocab_size = 512                                   # as resolved from the 512-token tokenizer
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    for record in (r for r in read_metrics(tmp_path) if "loss" in r):
        tokens_per_s = record["tokens_per_s"]
        assert record["tflops_per_device"] == pytest.approx(tokens_per_s * per_token.model / 1e12, rel=1e-9)
        assert record["tflops_causal_per_device"] == pytest.approx(tokens_per_s * per_token.model_causal / 1e12,
                                                                   rel=1e-9)
        assert record["hardware_tflops_per_device"] == record["tflops_per_device"]     # no recomputation
        assert 0 < record["mfu_causal"] < record["mfu"] < 1
        assert record["mfu_causal"] / record["mfu"] == pytest.approx(per_token.model_causal / per_token.model)
    out = capsys.readouterr().out
    assert "TFLOP/s/device | MFU" in out and "(causal-halved " in out and "measured float32 matmul" in out
    assert "counts half as Megatron does" in out


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tiny_corpus, tmp_path, capsys):
    """Resume with a flipped byte in the newest checkpoint: the previous one verifies and is used, both named;
    the losses after it equal the uninterrupted run's. `megalm checkpoint list` shows each state."""
    from megalm.cli import main

    straight = tmp_path / "straight"
    run(tiny_corpus, straight, **{"train.steps": 6})
    run_dir = tmp_path / "run"
    run(tiny_corpus, run_dir, **{"train.steps": 6, "checkpoint.interval": 2, "checkpoint.keep": 3,
                                 "train.stop_at_step": 4})
    newest = latest_checkpoint(run_dir)
    assert newest.name == "step_0000004"
    shard = next(newest.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run_dir / "checkpoints" / "step_0000006.tmp").mkdir()              # an unfinished save beside them
    assert main(["checkpoint", "list", str(run_dir)]) == 0
    listing = capsys.readouterr().out
    assert "step_0000002" in listing and "committed, verified (step 2" in listing
    assert "step_0000004 (latest)" in listing and "damaged:" in listing and "does not match its sha256" in listing
    assert "step_0000006.tmp" in listing and "uncommitted" in listing
    run(tiny_corpus, run_dir, **{"train.steps": 6, "checkpoint.interval": 2, "checkpoint.keep": 3})
    out = capsys.readouterr().out
    assert "step_0000004 is damaged" in out and "falling back to" in out and "resuming from" in out
    assert "at step 2 instead" in out
    after = {s: v for s, v in losses(run_dir).items()}
    assert all(after[s] == losses(straight)[s] for s in (3, 4, 5, 6))


def test_an_older_step_of_the_run_can_be_named_and_a_missing_marker_is_said(tiny_corpus, tmp_path, capsys):
    run(tiny_corpus, tmp_path, **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3})
    older = tmp_path / "checkpoints" / "step_0000002"
    capsys.readouterr()
    result = run(tiny_corpus, tmp_path, **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3,
                                           "checkpoint.load": str(older)})
    assert result["step"] == 4 and f"resuming from {older} at step 2" in capsys.readouterr().out
    (latest_checkpoint(tmp_path) / "COMMITTED").unlink()
    run(tiny_corpus, tmp_path, **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3})
    assert "names step_0000004, which is not committed; using the newest committed checkpoint, step_0000002" in \
        capsys.readouterr().out


def test_a_checkpoint_that_predates_new_model_keys_resumes(tiny_corpus, tmp_path):
    """A manifest written before model.head_dim, qk_norm and rope_scaling existed: the missing keys are the
    defaults the model was trained with, not a different model."""
    import json

    run(tiny_corpus, tmp_path, **{"train.steps": 2})
    manifest_file = latest_checkpoint(tmp_path) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for key in ("head_dim", "qk_norm", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_seq_len"):
        del manifest["config"]["model"][key]
    manifest_file.write_text(json.dumps(manifest))
    (manifest_file.parent / "COMMITTED").write_text("1700000000\n")    # markers of that time record no digest
    assert run(tiny_corpus, tmp_path, **{"train.steps": 3})["step"] == 3


def test_compiled_blocks_train_as_eager_does(tiny_corpus, tmp_path):
    """train.compile: each block through torch.compile, with full recomputation: the same losses as eager within
    fp32 rounding (rtol 1e-5; inductor fuses and reorders reductions), and a checkpoint with the same names."""
    extra = {"train.steps": 3, "parallel.activation_checkpointing": "full"}
    run(tiny_corpus, tmp_path / "eager", **extra)
    run(tiny_corpus, tmp_path / "compiled", **extra, **{"train.compile": "true"})
    import torch

    from megalm.checkpoint.load import CheckpointReader

    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    torch.testing.assert_close(torch.tensor(list(compiled.values())), torch.tensor(list(eager.values())),
                               rtol=1e-5, atol=0)
    names = [set(CheckpointReader(latest_checkpoint(tmp_path / d)).manifest["tensors"]) for d in ("eager", "compiled")]
    assert names[0] == names[1]


def test_a_split_too_small_to_evaluate_is_refused_before_the_first_step(tiny_corpus, tmp_path):
    from megalm.data.errors import DataError

    overrides = tiny_overrides(tiny_corpus, tmp_path, **{"train.micro_batch_size": 128, "train.global_batch_size": 128,
                                                     "train.eval_samples": 128})           # valid holds 123
    with pytest.raises(DataError, match="cannot fill one micro-batch of 128"):
        train(load_config(None, overrides))
    assert not [r for r in read_metrics(tmp_path) if "loss" in r]          # not one step was trained
