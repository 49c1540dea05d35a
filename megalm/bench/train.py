"""``megalm bench train``: training throughput of a config, side by side with baselines measured in the same run.

Prints tokens/s, TFLOP/s and MFU (against this device's measured matmul peak) for:
  - megalm's training step (native engine, the config's precision), one process;
  - a plain PyTorch loop (AdamW) over Hugging Face transformers' model of the same shape, when installed;
  - megalm at tp = 2 (and more with --tp), spawned on this host, with the tensor-parallel traffic it counted per
    step beside the formula 8 b s h (t-1)/t per layer and micro-batch (Korthikanti et al. 2022, ring collectives).
Random tokens, so the data loader is not measured. Results go to --out as JSON and a PNG bar chart.
"""
from __future__ import annotations

import argparse

import torch

from megalm.bench.harness import Timing, figure, measured_matmul_flops, save_plot, steady, write_result
from megalm.config import Config, load_config, resolve
from megalm.flops import flops_per_token, mfu


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def megalm_step_timing(cfg: Config, steps: int, warmup: int) -> Timing:
    """megalm's training step (native engine, pp = 1) on random tokens, in the current process group."""
    from megalm.engine import build_engine
    from megalm.parallel.pipeline.p2p import P2P, activation_shape
    from megalm.parallel.topology import build_topology
    from megalm.train.step import train_step

    device = _device()
    topo = build_topology(cfg.parallel.tp, 1, sequence_parallel=cfg.parallel.sequence_parallel)
    engine = build_engine(cfg, topo, device)
    t = cfg.train
    p2p = P2P(topo, activation_shape(t.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size, topo),
              engine.activation_dtype, device)
    micro = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), device=device)
             for _ in range(t.global_batch_size // (t.micro_batch_size * topo.dp))]
    return steady(lambda: train_step(engine, p2p, "1f1b", micro, topo, 1e-4, 0), steps, warmup, device)


def hf_step_timing(cfg: Config, steps: int, warmup: int) -> Timing | None:
    try:
        import transformers
    except ImportError:
        return None
    from megalm.checkpoint.hf import hf_config_from_model

    device = _device()
    hf = hf_config_from_model(cfg.model)
    kind = transformers.GPT2Config if hf["model_type"] == "gpt2" else transformers.LlamaConfig
    model_cls = transformers.GPT2LMHeadModel if hf["model_type"] == "gpt2" else transformers.LlamaForCausalLM
    model = model_cls(kind(**{k: v for k, v in hf.items() if k != "architectures"})).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = cfg.train
    micro = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), device=device)
             for _ in range(t.global_batch_size // t.micro_batch_size)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    def step():
        for tokens in micro:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return steady(step, steps, warmup, device)


def _tp_worker(rank, world, cfg_dict, steps, warmup, queue):
    from megalm.parallel.tensor.comm import TP_KINDS, CommStats

    cfg = resolve(Config.from_dict(cfg_dict), world)
    timing = megalm_step_timing(cfg, steps, warmup)
    # Count one step's tensor-parallel traffic on a fresh model (the timing above ran without counting).
    from megalm.parallel.parallelize import build_chunks
    from megalm.parallel.topology import build_topology

    topo = build_topology(world, 1, sequence_parallel=cfg.parallel.sequence_parallel)
    chunk = build_chunks(cfg, topo, torch.device("cpu"))[0]
    chunk.tp.comm = stats = CommStats()
    t = cfg.train
    for _ in range(t.global_batch_size // t.micro_batch_size):
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1))
        chunk(tokens[:, :-1], tokens[:, 1:]).backward()
    queue.put((rank, timing.median_s, timing.spread, float(stats.total(*TP_KINDS)),
               float(sum(stats.elements.values()))))


def tp_result(cfg: Config, tp: int, steps: int, warmup: int) -> dict:
    """megalm at tensor-parallel size ``tp``, spawned on this host, and the traffic it counted per step."""
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    cfg_dict = {**cfg.to_dict(), "parallel": {**cfg.to_dict()["parallel"], "tp": tp}}
    run_distributed(_tp_worker, tp, cfg_dict, steps, warmup, queue, timeout_s=1800)
    results = sorted(queue.get() for _ in range(tp))
    t, m = cfg.train, cfg.model
    formula = m.num_layers * 8 * t.global_batch_size * cfg.data.seq_len * m.hidden_size * (tp - 1) / tp
    slowest = max(results, key=lambda r: r[1])
    return {"timing": Timing(slowest[1], slowest[2], steps), "tp_elements_counted": results[0][3],
            "tp_elements_formula": formula, "all_elements_counted": results[0][4]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="a YAML file or a preset name")
    ap.add_argument("--vocab-size", type=int, default=8192, help="used when the config leaves it unset")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="*", default=[2], help="tensor-parallel sizes to run (0 for none)")
    ap.add_argument("--out", help="result folder (default runs/bench-train)")
    ap.add_argument("--compare", metavar="OLD.json", help="an earlier result: the regression gate after this run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    loaded = load_config(args.config, args.overrides)
    if loaded.model.vocab_size is None:
        loaded.set("model.vocab_size", args.vocab_size)
    cfg = resolve(loaded, 1)
    device = _device()
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measured_matmul_flops(device, peak_dtype)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_token = flops_per_token(cfg.model, cfg.data.seq_len, cfg.parallel.activation_checkpointing)
    rows = {"megalm tp=1": megalm_step_timing(cfg, args.steps, args.warmup)}
    hf = hf_step_timing(cfg, args.steps, args.warmup)
    if hf is not None:
        rows["transformers + torch loop"] = hf
    comm = {}
    for tp in [t for t in args.tp if t > 1]:
        comm[tp] = tp_result(loaded, tp, args.steps, args.warmup)
        rows[f"megalm tp={tp}"] = comm[tp].pop("timing")
    print(f"device {device} ({torch.get_num_threads()} threads), measured matmul peak {peak / 1e12:.3f} TFLOP/s "
          f"({str(peak_dtype).replace('torch.', '')}); {tokens} tokens/step; {per_token.model / 1e6:.2f} MFLOP/token")
    print("MFU counts attention's causal score matrix in full (PaLM, TorchTitan); MFU-causal counts half (Megatron)")
    print(f"{'run':28s} {'s/step':>8s} {'spread':>7s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'MFU-causal':>10s}")
    report = {"device": str(device), "peak_flops": peak, "tokens_per_step": tokens, "rows": {}, "tp_comm": comm,
              "figures": {}}
    for name, timing in rows.items():
        rate = tokens / timing.median_s
        flops, causal = rate * per_token.model, mfu(rate, per_token, peak, causal=True)
        report["rows"][name] = {"seconds_per_step": timing.median_s, "spread": timing.spread, "tokens_per_s": rate,
                                "tflops": flops / 1e12, "mfu": flops / peak, "mfu_causal": causal}
        report["figures"][f"{name} tokens/s"] = figure(rate, timing.spread, "higher")
        print(f"{name:28s} {timing.median_s:8.3f} {timing.spread:7.1%} {rate:10,.0f} {flops / 1e12:8.4f} "
              f"{flops / peak:6.1%} {causal:10.1%}")
    for tp, c in comm.items():
        print(f"tp={tp}: tensor-parallel elements per rank per step: counted {c['tp_elements_counted']:,.0f}, formula "
              f"{c['tp_elements_formula']:,.0f} (plus {c['all_elements_counted'] - c['tp_elements_counted']:,.0f} "
              f"in embedding, LM head, loss and replicated-gradient reductions)")
    path = write_result("train", report, args.out, context={"config": cfg.to_dict(), "steps": args.steps,
                                                             "warmup": args.warmup}, device=device)
    plot = save_plot(lambda fig, ax: _draw(ax, report), path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    if args.compare:
        from megalm.bench.compare import main as compare

        return compare([str(path), args.compare])
    return 0


def _draw(ax, report: dict) -> None:
    names = list(report["rows"])
    ax.barh(names, [report["rows"][n]["tokens_per_s"] for n in names])
    ax.set_xlabel("tokens/s")
    ax.set_title(f"training throughput on {report['device']}")
