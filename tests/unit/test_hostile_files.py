"""Never unpickle what a user hands us: pickle payloads planted in every file megalm reads never run (their
canary file is never created), and no code path in megalm unpickles a user's file."""
from __future__ import annotations

import ast
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megalm.cli import main as cli
from megalm.data.tokenizer import tokenizer_path
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates the canary file: proof that code ran."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (Path.touch, (Path(self.canary),))


def payload(canary: Path) -> bytes:
    return pickle.dumps({"weights": _Payload(canary)})


def torch_payload(canary: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"module": _Payload(canary)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    assert cli(["train"] + tiny_overrides(tiny_corpus, run_dir, **{"train.steps": 2})) == 0
    hf = run_dir.parent / "hf"
    assert cli(["convert", "to-hf", "--src", str(run_dir), "--dst", str(hf)]) == 0
    return run_dir, hf


def _step(run: Path) -> Path:
    return next(run.glob("checkpoints/step_*"))


def _plant(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# Each case: (name, plant(work, canary) -> argv for megalm). Every argv is a command a user would run on the file.
def _checkpoint_case(target: str, command: str, torch_format: bool = False):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        copy = work / "run"
        shutil.copytree(run, copy)
        files = {"shard": next(_step(copy).glob("*.safetensors")), "manifest": _step(copy) / "manifest.json",
                 "tokenizer": _step(copy) / "tokenizer.json", "special": _step(copy) / "tokenizer.special.json",
                 "latest": copy / "checkpoints" / "latest"}
        _plant(files[target], torch_payload(canary) if torch_format else payload(canary))
        return files[target], {"eval": ["eval", "--checkpoint", str(copy), "--data", corpus, "--samples", "4"],
                "generate": ["generate", "--checkpoint", str(copy), "--max-new-tokens", "2"],
                "to-hf": ["convert", "to-hf", "--src", str(copy), "--dst", str(work / "out")],
                "layout": ["convert", "layout", "--src", str(copy), "--dst", str(work / "out"), "--tp", "2"],
                "train": ["train"] + tiny_overrides(corpus, copy, **{"train.steps": 3})}[command]
    return plant


def _hf_case(target: str):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        copy = work / "hf"
        shutil.copytree(hf, copy)
        if target == "bin-only":
            for f in copy.glob("*.safetensors"):
                f.unlink()
            _plant(copy / "pytorch_model.bin", torch_payload(canary))
            planted = copy                                # refused by the folder's kind, before any file opens
        elif target == "training_args":
            planted = copy / "training_args.bin"
            _plant(planted, torch_payload(canary))      # beside the weights, never opened
        else:
            planted = copy / {"weights": next(copy.glob("*.safetensors")).name, "config": "config.json",
                              "tokenizer": "tokenizer.json"}[target]
            _plant(planted, payload(canary))
        return planted, ["convert", "from-hf", "--src", str(copy), "--dst", str(work / "out")]
    return plant


def _deepspeed_case(target: str):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        folder = work / "ds" / "global_step2"
        folder.mkdir(parents=True)
        (work / "ds" / "latest").write_text("global_step2")
        optim = io.BytesIO()             # a ZeRO-2 optimizer file the converter reads up to the model states
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "single_partition_of_fp32_groups": [torch.zeros(4)],
                                             "base_optimizer_state": {"state": {}}}}, optim)
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(optim.getvalue())
        name = {"model": "mp_rank_00_model_states.pt", "optim": "zero_pp_rank_0_mp_rank_00_optim_states.pt"}[target]
        _plant(folder / name, torch_payload(canary))
        config = work / "tiny.yaml"
        config.write_text("model:\n  num_layers: 2\n  hidden_size: 32\n  num_heads: 4\n  vocab_size: 512\n"
                          f"data:\n  prefix: {corpus}\n")
        return folder / name, ["convert", "from-deepspeed", "--src", str(work / "ds"), "--dst", str(work / "out"),
                "--config", str(config)]
    return plant


def _data_case(target: str):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        prefix = work / "data"
        for suffix in (".bin", ".idx", ".tokenizer.json", ".tokenizer.special.json"):
            shutil.copyfile(f"{corpus}{suffix}", f"{prefix}{suffix}")
        if target == "sample-cache":
            assert cli(["train"] + tiny_overrides(str(prefix), work / "warm", **{"train.steps": 1})) == 0
            caches = list(work.glob("data.*.samples.npy"))
            assert caches
            for cache in caches:
                with open(cache, "wb") as f:
                    np.save(f, np.array([_Payload(canary)], dtype=object), allow_pickle=True)
            planted = caches[0]
        else:
            planted = Path({"idx": f"{prefix}.idx", "bin": f"{prefix}.bin", "tokenizer": tokenizer_path(prefix),
                            "special": f"{prefix}.tokenizer.special.json"}[target])
            _plant(planted, payload(canary))
        return planted, ["train"] + tiny_overrides(str(prefix), work / "run", **{"train.steps": 1})
    return plant


def _input_case(target: str):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        folder = work / "in"
        folder.mkdir()
        (folder / "ok.txt").write_text("plain text beside the payload\n")
        if target in ("parquet", "arrow"):
            import pyarrow as pa
            meta = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": payload(canary)}
            schema = pa.schema([pa.field("text", pa.string()), pa.field("extra", pa.binary(), metadata=meta)])
            table = pa.table({"text": ["hello"], "extra": [b"x"]}, schema=schema)
            if target == "parquet":
                import pyarrow.parquet as pq
                pq.write_table(table, folder / "docs.parquet")
            else:
                with pa.OSFile(str(folder / "docs.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
                    w.write_table(table)
        elif target == "hf-state":
            ds = folder / "ds"
            ds.mkdir()
            (ds / "dataset_info.json").write_text("{}")
            _plant(ds / "state.json", payload(canary))
        else:
            _plant(folder / {"jsonl": "docs.jsonl", "pkl": "docs.pkl", "json": "docs.json"}[target], payload(canary))
        return folder, ["preprocess", "--input", str(folder), "--output-prefix", str(work / "out"), "--tokenizer",
                tokenizer_path(corpus), "--on-error", "skip", "--workers", "1", "--quiet"]
    return plant


def _config_case(target: str):
    def plant(work: Path, run: Path, hf: Path, corpus: str, canary: Path) -> list[str]:
        if target == "yaml":
            config = work / "evil.yaml"
            config.write_text(f"train:\n  steps: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:"
                              f"pathlib.Path ['{canary}']]\n")
            return config, ["train", "--config", str(config)] + tiny_overrides(corpus, work / "run")[:-1]
        ds_json = work / "ds.json"
        _plant(ds_json, payload(canary))
        return ds_json, ["train"] + tiny_overrides(corpus, work / "run", **{"parallel.deepspeed_config": str(ds_json),
                                                                  "train.steps": 1})
    return plant


CASES = {
    **{f"checkpoint {t} ({c})": _checkpoint_case(t, c) for t, c in [
        ("shard", "eval"), ("shard", "train"), ("shard", "to-hf"), ("manifest", "eval"), ("manifest", "layout"),
        ("tokenizer", "generate"), ("special", "generate"), ("latest", "eval")]},
    "checkpoint shard as torch.save (eval)": _checkpoint_case("shard", "eval", torch_format=True),
    **{f"hugging face {t}": _hf_case(t) for t in ("bin-only", "weights", "config", "tokenizer", "training_args")},
    **{f"deepspeed {t}": _deepspeed_case(t) for t in ("model", "optim")},
    **{f"dataset {t}": _data_case(t) for t in ("idx", "bin", "tokenizer", "special", "sample-cache")},
    **{f"preprocess input {t}": _input_case(t) for t in ("jsonl", "pkl", "json", "parquet", "arrow", "hf-state")},
    **{f"config {t}": _config_case(t) for t in ("yaml", "deepspeed-json")},
}


def test_at_least_twenty_places():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_planted_pickle_never_runs(name, trained, tiny_corpus, tmp_path, capsys):
    run, hf = trained
    canary = tmp_path / "CANARY"
    planted, argv = CASES[name](tmp_path, run, hf, tiny_corpus, canary)
    try:
        code = cli(argv)
    except SystemExit as e:      # argparse
        code = e.code
    out = capsys.readouterr()
    assert not canary.exists(), f"{name}: the payload ran"
    assert "Traceback" not in out.err, out.err[-2000:]
    print(name, "->", code, (out.err.strip().splitlines() or [""])[-1][:200])
    if code != 0:                       # refused: one line that names the file handed over
        assert planted.name in out.err, out.err[-1000:]
    else:                               # read around it: skipped and listed, rebuilt, or never opened
        assert name in ("dataset sample-cache", "hugging face training_args", "checkpoint latest (eval)") \
            or name.startswith("preprocess")


# ---------------------------------------------------------------- the code itself

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            yield node, name, {k.arg: k.value for k in node.keywords}


def test_no_code_path_unpickles_a_file():
    """pickle/marshal/dill/shelve loads, torch.load without weights_only=True, np.load without
    allow_pickle=False, yaml.load or unsafe_load: none in megalm or its kernels."""
    found = []
    for path in [*(ROOT / "megalm").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node, name, kw in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
                    "pickle", "cPickle", "marshal", "dill", "cloudpickle", "joblib", "shelve"):
                found.append(where)
            elif name in ("torch.load", "self.original") and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                found.append(where)
            elif name in ("np.load", "numpy.load") and not (
                    isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                found.append(where)
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "shelve.open"):
                found.append(where)
    assert found == [], found
