"""``megalm finetune``'s guard rails: a run directory of its own, and the checkpoint's tokenizer (checked for
every run that starts from or resumes a checkpoint).

A fine-tuning run writes only into a run directory it started: by default a new one named after the checkpoint
and the data (``runs/finetune-<checkpoint>-<data>``), or one given with ``train.run_dir=`` on the command line
(a config file's run_dir belongs to pretraining and is not used). A run directory holds ``finetune.json`` naming
the checkpoint and data it was started with; rerunning the same command resumes it, and any other directory
that already holds something is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megalm.config import ConfigError

MARKER = "finetune.json"


def _checkpoint_name(checkpoint: str) -> str:
    path = Path(checkpoint).resolve()
    if path.parent.name == "checkpoints":             # RUN/checkpoints/step_N -> RUN-step_N
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def default_run_dir(checkpoint: str, data: str | None, lora_rank: int = 0) -> str:
    data_name = Path(data).name if data else "data"
    suffix = f"-lora{lora_rank}" if lora_rank else ""
    return str(Path("runs") / f"finetune-{_checkpoint_name(checkpoint)}-{data_name}{suffix}")


def claim_run_dir(run_dir: str, checkpoint: str, data, lora: dict | None = None) -> None:
    """Make ``run_dir`` this fine-tuning's own, or refuse it when it holds another run (another checkpoint,
    other data, or full fine-tuning against LoRA or LoRA of other settings)."""
    folder = Path(run_dir)
    wanted = {"checkpoint": str(Path(checkpoint).resolve()), "data": data, "lora": lora}
    marker = folder / MARKER
    if marker.is_file():
        found = {"lora": None, **json.loads(marker.read_text())}
        if found != wanted:
            how = lambda r: f"LoRA {r['lora']}" if r["lora"] else "full fine-tuning"       # noqa: E731
            raise ConfigError(f"train.run_dir={run_dir} is the {how(found)} of {found['checkpoint']} on "
                              f"{found['data']}, not the {how(wanted)} of {wanted['checkpoint']} on {data}: "
                              f"pass another train.run_dir, or leave it out for a new one")
        return
    if folder.is_dir() and any(p.name != MARKER and not p.name.startswith(f".{MARKER}") for p in folder.iterdir()):
        fresh = default_run_dir(checkpoint, data if isinstance(data, str) else None, (lora or {}).get("rank", 0))
        raise ConfigError(f"train.run_dir={run_dir} already holds another run; fine-tuning never resumes or writes "
                          f"into a run it did not start: pass a new train.run_dir, or leave it out for {fresh}")
    if int(os.environ.get("RANK", "0")) == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(wanted, indent=1))
        os.replace(tmp, marker)


def finetune_overrides(checkpoint: str, config: str | None, overrides: list[str]) -> list[str]:
    """The overrides of a fine-tuning run: its checkpoint, weights only, and its own run directory."""
    from megalm.config import load_config

    overrides = [*overrides, f"checkpoint.load={checkpoint}", "checkpoint.load_weights_only=true"]
    cfg = load_config(config, overrides)
    data = list(cfg.data.blend) if cfg.data.blend is not None else cfg.data.prefix
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir=")]
    run_dir = given[-1] if given else default_run_dir(checkpoint, cfg.data.prefix, cfg.lora.rank)
    lora = ({"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
            if cfg.lora.rank else None)
    claim_run_dir(run_dir, checkpoint, data, lora)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megalm finetune: weights of {checkpoint}, data {data}, run directory {run_dir}", flush=True)
    return [*overrides, f"train.run_dir={run_dir}"]


def chat_data_prefix(checkpoint: str, jsonl: str, seq_len: int, loss_on: str = "all", overflow: str = "truncate",
                     template: str | None = None) -> str:
    """``megalm finetune --data FILE.jsonl``: the conversations prepared with the checkpoint's tokenizer (and its
    chat template) for ``seq_len``, under ``runs/chat-data/``, named by a hash of the file, the tokenizer and the
    options, so the same command reuses them and any change prepares them anew. Every rank prepares under its own
    temporary names when they are missing (renames are atomic and the bytes identical)."""
    import hashlib

    from megalm.checkpoint.format import latest_checkpoint
    from megalm.data.chat_preprocess import is_chat_dataset, preprocess_chat
    from megalm.data.tokenizer import special_path

    folder = latest_checkpoint(checkpoint)
    if folder is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no committed megalm checkpoint there")
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConfigError(f"--checkpoint {checkpoint} carries no tokenizer.json, so --data cannot be tokenized as "
                          f"it was trained: convert it again with its tokenizer")
    source = Path(jsonl)
    if not source.is_file():
        raise ConfigError(f"--data {jsonl}: no such file")
    special = Path(special_path(tokenizer))
    digest = hashlib.sha256()
    for part in (source.read_bytes(), tokenizer.read_bytes(), special.read_bytes() if special.is_file() else b"",
                 (Path(template).read_bytes() if template else b""), f"{seq_len}/{loss_on}/{overflow}".encode()):
        digest.update(part)
    prefix = Path("runs") / "chat-data" / f"{source.stem}-{digest.hexdigest()[:12]}"
    if not (is_chat_dataset(prefix) and Path(f"{prefix}.report.json").is_file()):
        say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda line: None)
        preprocess_chat([str(source)], str(tokenizer), str(prefix), seq_len + 1, overflow, loss_on,
                        Path(template).read_text() if template else None, say=say)
    return str(prefix)


def check_tokenizer(reader, data_tokenizer, data_prefix) -> None:
    """The data must be tokenized with the checkpoint's tokenizer (when the checkpoint carries one)."""
    from megalm.data.tokenizer import load_tokenizer
    # Read, not verified: restore() splits the verification of every file among the ranks and names damage.
    if data_tokenizer is None or "tokenizer.json" not in reader.manifest["files"]:
        return
    try:
        mine = load_tokenizer(reader.folder / "tokenizer.json")
    except Exception:      # unreadable or damaged: restore() names it and falls back to an older one
        return
    same = json.loads(mine.to_str()) == json.loads(data_tokenizer.to_str()) and \
        mine.special.to_dict() == data_tokenizer.special.to_dict()
    if not same:
        raise ConfigError(f"the data at {data_prefix} was tokenized with another tokenizer than {reader.folder}'s "
                          f"(vocabularies of {data_tokenizer.vocab_size} and {mine.vocab_size} tokens): preprocess "
                          f"it with --tokenizer {reader.folder}/tokenizer.json")
