"""``megalm convert``: checkpoints between megalm layouts, from and to Hugging Face, from DeepSpeed ZeRO.

    megalm convert layout  --src CKPT --dst DIR [--tp N] [--pp N] [--virtual-stages N] [--verify]
    megalm convert from-hf --src HF_DIR --dst DIR [--tp N] [--pp N] [--verify]
    megalm convert to-hf   --src CKPT --dst HF_DIR [--verify]
    megalm convert from-deepspeed --src DS_DIR --dst DIR --config FILE [--tag TAG] [--verify]
    megalm convert merge-lora --src LORA_CKPT --dst DIR [--verify]      (adapters folded into their base)
    megalm convert to-peft --src LORA_CKPT --dst PEFT_DIR               (adapter_config.json + safetensors)

``to-hf`` of a LoRA checkpoint writes the merged model.

Every conversion streams one tensor (or one piece of one) at a time: peak memory is a small multiple of the
largest tensor. The destination is written aside and renamed into place at the end, and an existing
destination is never overwritten. ``--verify`` runs the model before and after on a fixed batch and fails
unless the logits agree (max |difference| <= 1e-5 and KL <= 1e-9 in fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megalm.checkpoint.convert_common import (  # noqa: F401 (base_meta, write_checkpoint: used from here)
    base_meta,
    prepare_destination,
    reader_verified_alongside,
    write_checkpoint,
)
from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.layout import ConvertError
from megalm.checkpoint.load import CheckpointReader, rows_byte_range, safetensors_offsets
from megalm.checkpoint.lora import MergedAdapters, convert_merge_lora, convert_to_peft, holds_adapters
from megalm.checkpoint.writer import PlannedSafetensorsFile, dtype_from_name
from megalm.config import Config

# ---- megalm -> megalm (another layout) -------------------------------------------------------------------

def convert_layout(src, dst, tp=1, pp=1, vs=1) -> dict:
    folder = latest_checkpoint(src)
    if folder is None:
        raise ConvertError(f"no committed megalm checkpoint under {src}")
    reader, verified = reader_verified_alongside(folder)
    m = reader.manifest
    if reader.base is not None:
        raise ConvertError(f"{folder} holds LoRA adapters (their base: {reader.base.folder}); they load in any "
                           f"layout as they are, or merge them first with convert merge-lora")
    cfg = Config.from_dict({k: v for k, v in m["config"].items()})
    tensors = {n: (e["dtype"], tuple(e["shape"])) for n, e in m["tensors"].items()}
    config = {**m["config"], "parallel": {**m["config"]["parallel"], "tp": tp, "pp": pp, "virtual_stages": vs,
                                          "dp": None}}
    meta = {"step": m["step"], "config": config, "data_prefix": m["data"]["prefix"],
            "consumed_samples": m["data"]["consumed_samples"], "optimizer_name": m["optimizer"]["name"],
            "optimizer_step": m["optimizer"]["step"], "has_optimizer_state": m["optimizer"]["has_state"],
            "loss_scale": m.get("loss_scale")}
    tok = folder / "tokenizer.json"
    return write_checkpoint(Path(dst), cfg.model, tensors, reader.read, meta, tp, pp, vs, tok, "convert layout",
                            before_commit=verified.result, locate=reader.byte_range)


# ---- Hugging Face -> megalm ------------------------------------------------------------------------------

def _hf_tensor_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src} holds no *.safetensors files (PyTorch .bin checkpoints are refused: loading "
                           f"them would unpickle untrusted data; convert them to safetensors first)")
    return files


def _open_safetensors(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:                # safetensors raises its own error type for a damaged header
        raise ConvertError(f"{path} is not a readable safetensors file ({e})") from None


def convert_from_hf(src, dst, tp=1, pp=1, vs=1) -> dict:
    from megalm.checkpoint.hf import from_hf, model_config_from_hf

    src = Path(src)
    if not (src / "config.json").exists():
        raise ConvertError(f"{src}/config.json is missing: not a Hugging Face model folder")
    try:
        hf_config = json.loads((src / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{src}/config.json is not valid JSON ({e}): not a Hugging Face model config") from None
    model = model_config_from_hf(hf_config)
    cfg = Config(model=model)
    files = _hf_tensor_files(src)
    # Plan from the headers: run the name mapping over meta tensors of the stored dtypes and shapes.
    handles = {f: _open_safetensors(f) for f in files}
    tensors, where, stored_as_is = {}, {}, {}
    for f, h in handles.items():
        offsets = safetensors_offsets(f)
        for key in h.keys():
            s = h.get_slice(key)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[s.get_dtype()]
            meta = torch.empty(s.get_shape(), dtype=dtype, device="meta")
            for name, t in from_hf([(key, meta)], model):
                tensors[f"model.{name}"] = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
                where[f"model.{name}"] = (f, key)
                if t is meta:                  # renamed only (not transposed or split): copyable as bytes
                    stored_as_is[f"model.{name}"] = (f, *offsets[key][:2], t.shape[0] if t.dim() else 1)
    last = threading.local()   # per writer thread: the HF tensor read last, mapped (GPT-2's c_attn feeds q, k, v)

    def read(name, spec, local_shape):
        f, key = where[name]
        if getattr(last, "key", None) != (f, key):
            last.key, last.tensors = (f, key), {f"model.{n}": t for n, t in
                                                from_hf([(key, handles[f].get_tensor(key))], model)}
        return spec.view(last.tensors[name])    # the writer copies only what is strided

    def locate(name, spec):
        if name not in stored_as_is:
            return None
        f, start, end, rows = stored_as_is[name]
        found = rows_byte_range(start, end, 0, rows, rows, spec)
        return None if found is None else (f, *found)

    tokenizer = _source_tokenizer(src)
    return write_checkpoint(Path(dst), model, tensors, read, base_meta(cfg), tp, pp, vs,
                            src / "tokenizer.json" if tokenizer else None, "convert from-hf", locate=locate,
                            special=tokenizer.special if tokenizer else None)


def _source_tokenizer(src: Path):
    """The Hugging Face folder's tokenizer, checked to be one (and its special tokens read) before it is copied;
    None when the folder has no tokenizer.json."""
    from megalm.data.tokenizer import load_tokenizer

    return load_tokenizer(src) if (src / "tokenizer.json").exists() else None


# ---- megalm -> Hugging Face ------------------------------------------------------------------------------

def convert_to_hf(src, dst) -> dict:
    from megalm.checkpoint.hf import hf_config_from_model, to_hf

    folder = latest_checkpoint(src)
    if folder is None:
        raise ConvertError(f"no committed megalm checkpoint under {src}")
    reader, verified = reader_verified_alongside(folder)
    model = Config.from_dict(reader.manifest["config"]).model
    hf_config = hf_config_from_model(model)
    source = MergedAdapters(reader) if holds_adapters(reader) else reader      # LoRA: the merged model
    names = [n for n in source.tensor_names() if n.startswith("model.")]
    meta = ((n[len("model."):], torch.empty(source.global_shape(n), device="meta",
                                            dtype=dtype_from_name(source.dtype_name(n))))
            for n in names)
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in to_hf(meta, model)]
    dst = Path(dst)
    tmp = prepare_destination(dst)
    start = time.perf_counter()
    out = PlannedSafetensorsFile(tmp / "model.safetensors", entries, sha256=False)   # Hugging Face keeps none
    total = 0
    as_read: dict = {}                  # id of a tensor as read -> (its name, the tensor): passed on unchanged?

    def stream():
        for n in tqdm(names, desc="convert to-hf", leave=False):
            t = source.read(n)
            as_read[id(t)] = (n, t)
            yield n[len("model."):], t

    for key, tensor in to_hf(stream(), model):
        name, original = as_read.pop(id(tensor), (None, None))
        out.put(key, tensor, source.byte_range(name) if original is tensor else None)
        total += tensor.numel() * tensor.element_size()
        as_read.clear()
    out.close()
    out.wait_durable()
    tokenizer = reader.tokenizer()
    if tokenizer is not None:
        hf_config.update(_token_ids(tokenizer))
        _write_hf_tokenizer(tmp, folder / "tokenizer.json", tokenizer, model.max_seq_len)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
    verified.result()                             # the source's sha256s, checked alongside; raises if damaged
    if dst.exists():
        dst.rmdir()                               # empty: _prepare_destination refused anything else
    tmp.rename(dst)
    seconds = time.perf_counter() - start
    print(f"convert to-hf: wrote {total / 1e9:.3f} GB to {dst} in {seconds:.2f}s "
          f"({total / 1e9 / max(seconds, 1e-9):.2f} GB/s)", flush=True)
    return {"bytes": total, "seconds": seconds}


def _token_ids(tokenizer) -> dict:
    ids = {"bos_token_id": tokenizer.token_id(tokenizer.special.bos), "eos_token_id": tokenizer.eod_id,
           "pad_token_id": tokenizer.token_id(tokenizer.special.pad)}
    return {k: v for k, v in ids.items() if v is not None}


def _write_hf_tokenizer(out: Path, tokenizer_file: Path, tokenizer, max_len: int) -> None:
    """tokenizer.json as it is (no token added), and what transformers reads beside it: the special tokens in
    tokenizer_config.json and special_tokens_map.json, the chat template, and the ids in generation_config.json."""
    special = tokenizer.special
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    tokens = {f"{role}_token": getattr(special, role if role != "eos" else "eod") for role in ("bos", "eos", "pad")}
    tokens = {k: v for k, v in tokens.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "add_bos_token": special.add_bos,
              "add_eos_token": False, "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    if special.chat_template is not None:
        config["chat_template"] = special.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=1))
    (out / "generation_config.json").write_text(json.dumps(_token_ids(tokenizer), indent=1))


# ---- DeepSpeed ZeRO -> megalm ----------------------------------------------------------------------------

def convert_from_deepspeed(src, dst, config_file, tag=None) -> dict:
    from megalm.checkpoint.deepspeed import convert_deepspeed_checkpoint
    from megalm.config import load_config
    from megalm.config.resolve import resolve_vocab
    from megalm.data.tokenizer import dataset_tokenizer

    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty; megalm convert never overwrites: choose a new --dst")
    cfg = load_config(config_file)
    from megalm.data.blend import tokenizer_prefix
    resolve_vocab(cfg, dataset_tokenizer(tokenizer_prefix(cfg.data)))    # as `megalm train` did: its tokenizer
    return convert_deepspeed_checkpoint(src, dst, cfg, tag=tag)


# ---- command line ----------------------------------------------------------------------------------------

def check_destination(dst: Path) -> None:
    """Before any work: --dst must be a new path (or an empty folder) whose parent can be written."""
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"--dst {dst} is a file; give a folder path that does not exist yet")
    if dst.is_dir() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty; megalm convert never overwrites: choose a new --dst")
    parent = dst.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"cannot write into {parent} (permission denied); choose another --dst")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm convert", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    for kind in ("layout", "from-hf", "to-hf", "from-deepspeed", "merge-lora", "to-peft"):
        p = sub.add_parser(kind)
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument("--verify", action=argparse.BooleanOptionalAction,
                       default=kind in ("from-hf", "to-hf", "merge-lora"),
                       help="compare the logits of source and result before anything is committed at --dst "
                            "(default: on for from-hf, to-hf and merge-lora; to-peft has no model of its own)")
        p.add_argument("--verify-seq-len", type=int, default=1024,
                       help="the longest verification batch (capped at the model's max_seq_len)")
        if kind in ("layout", "from-hf"):
            p.add_argument("--tp", type=int, default=1)
            p.add_argument("--pp", type=int, default=1)
            p.add_argument("--virtual-stages", type=int, default=1)
        if kind == "from-deepspeed":
            p.add_argument("--config", required=True, help="the megalm config the DeepSpeed run trained")
            p.add_argument("--tag", help="checkpoint tag (default: the 'latest' file)")
    args = ap.parse_args(argv)
    if args.kind == "to-peft" and args.verify:
        ap.error("to-peft writes adapters alone, which have no logits of their own: load them with peft on the "
                 "model convert to-hf writes from the base")
    dst = Path(args.dst)
    check_destination(dst)
    staging = dst.resolve().parent / f".{dst.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert(args, staging)
        if args.verify:
            _verify(args, staging)
        if dst.is_dir():
            dst.rmdir()                                  # empty: check_destination refused anything else
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)      # after an error nothing is left at --dst or beside it
        for leftover in staging.parent.glob(f"{staging.name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
    print(f"convert {args.kind}: committed {dst}" + (" (verified)" if args.verify else " (not verified: "
                                                      "--no-verify)" if args.kind in ("from-hf", "to-hf") else ""))
    return 0


def _convert(args, dst: Path) -> None:
    if args.kind == "layout":
        convert_layout(args.src, dst, args.tp, args.pp, args.virtual_stages)
    elif args.kind == "from-hf":
        convert_from_hf(args.src, dst, args.tp, args.pp, args.virtual_stages)
    elif args.kind == "to-hf":
        convert_to_hf(args.src, dst)
    elif args.kind == "merge-lora":
        convert_merge_lora(args.src, dst)
    elif args.kind == "to-peft":
        convert_to_peft(args.src, dst)
    else:
        convert_from_deepspeed(args.src, dst, args.config, args.tag)


def _verify(args, result: Path) -> dict:
    """Logits of the source (in its own format) against the converted model (in megalm or transformers)."""
    from megalm.checkpoint import verify

    megalm_side = args.src if args.kind == "to-hf" else result
    model_cfg = Config.from_dict(CheckpointReader(latest_checkpoint(megalm_side)).manifest["config"]).model
    if args.kind in ("layout", "merge-lora"):
        before, after = verify.megalm_logits_fn(args.src), verify.megalm_logits_fn(result)
    elif args.kind == "from-hf":
        before, after = verify.hf_logits_fn(args.src), verify.megalm_logits_fn(result)
    elif args.kind == "to-hf":
        before, after = verify.megalm_logits_fn(args.src), verify.hf_logits_fn(result)
    else:
        from megalm.checkpoint.deepspeed import deepspeed_logits_fn

        before, after = deepspeed_logits_fn(args.src, model_cfg, args.tag), verify.megalm_logits_fn(result)
    return verify.verify(before, after, model_cfg, f"convert {args.kind}", args.verify_seq_len)
