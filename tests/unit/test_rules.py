"""The rule book's value ranges, resolution into one frozen config, and the command line's refusals: each bad
value is one line that names it and the fix."""
import pytest

from megalm.cli import main
from megalm.config import ConfigError, FrozenConfigError, load_config, resolve
from megalm.config.rules import RANGES, check_sampling, validate


@pytest.mark.parametrize("override,needles", [
    ("optimizer.min_lr=-1e-4", ["optimizer.min_lr=-0.0001", ">= 0.0"]),
    ("optimizer.min_lr=1e-2", ["optimizer.min_lr=0.01 is above optimizer.lr=0.001", "min_lr <= lr"]),
    ("lr.warmup_steps=-5", ["lr.warmup_steps=-5", ">= 0"]),
    ("train.grad_clip=-1", ["train.grad_clip=-1.0", ">= 0.0"]),
    ("model.dropout=1.0", ["model.dropout=1.0", "< 1.0"]),
    ("optimizer.beta2=1.5", ["optimizer.beta2=1.5", "< 1.0"]),
    ("optimizer.eps=0", ["optimizer.eps=0.0", "> 0.0"]),
    ("train.eval_samples=0", ["train.eval_samples=0", ">= 1"]),
    ("checkpoint.keep=0", ["checkpoint.keep=0", ">= 1"]),
    ("parallel.timeout_s=0", ["parallel.timeout_s=0.0", "> 0.0"]),
    ("parallel.zero_stage=4", ["parallel.zero_stage=4", "0, 1, 2, 3"]),
    ("data.split=[1,-1,1]", ["data.split=[1, -1, 1]", "non-negative"]),
])
def test_values_out_of_range_are_refused(override, needles):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, [override]))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_every_numeric_key_has_a_range():
    """A key added to the schema without a range fails here until the rule book gives it one."""
    from dataclasses import fields

    from megalm.config import SECTIONS

    exempt = {"train.initial_loss_scale"}        # its own rule: a power of two >= 1
    numeric = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
               if any(t in str(f.type) for t in ("int", "float")) and "str" not in str(f.type)}
    numeric -= {k for k in numeric if k.startswith("parallel.zero_stage")}   # a choice: 0-3
    assert numeric - exempt - set(RANGES) == set()


def test_resolution_freezes_and_records_what_the_user_set(tmp_path):
    cfg = load_config(None, ["model.vocab_size=512", "train.micro_batch_size=8", "train.global_batch_size=8"])
    assert cfg.is_set("train.micro_batch_size") and not cfg.is_set("train.steps")
    resolved = resolve(cfg, 1)
    assert resolved.frozen and not cfg.frozen                 # the loaded config is left as it was
    with pytest.raises(FrozenConfigError, match="resolved and frozen"):
        resolved.train.steps = 3
    with pytest.raises(FrozenConfigError):
        resolved.model = None
    assert resolved.is_set("train.micro_batch_size") and resolved.explicit_keys == cfg.explicit_keys
    again = resolved.mutable_copy()
    again.train.steps = 3                                      # a copy can change; the resolved one did not
    assert resolved.train.steps == 200 and again.is_set("model.vocab_size")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml is not valid YAML at line \d+"):
        load_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=r"list.yaml must hold a mapping of sections .* not a list"):
        load_config(str(listed))
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="config section 'model' must be a mapping"):
        load_config(str(section))
    with pytest.raises(ConfigError, match=r"train.steps='\[1' cannot be read"):
        load_config(None, ["train.steps=[1"])


def test_cli_names_an_unknown_command_and_bad_yaml(tmp_path, capsys):
    assert main(["nope"]) == 2
    assert "megalm: unknown command 'nope'" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "megalm: error (rank 0 on" in err and "bad.yaml is not valid YAML" in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    ((-0.5, 50, 1.0, 8), "--temperature=-0.5"), ((0.8, -1, 1.0, 8), "--top-k=-1"),
    ((0.8, 50, 1.5, 8), "--top-p=1.5"), ((0.8, 50, 0.0, 8), "--top-p=0.0"), ((0.8, 50, 1.0, -2), "--max-new-tokens=-2"),
])
def test_sampling_arguments_have_ranges(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        check_sampling(*args)
    check_sampling(0.0, 0, 1.0, 0)                              # greedy, filters off, nothing to generate: valid
