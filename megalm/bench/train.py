"""``megalm bench train --config FILE [overrides]``: training throughput of a config, under any launcher and layout.

Launched like ``megalm train`` (torchrun, deepspeed, srun, mpirun, or one process), it runs the config's own
training step (engine, tp/pp/dp, ZeRO stage, kernels, recomputation, compile) on random tokens (``--data real``:
the config's dataset): warm-up, a steady window, then a few breakdown steps. Rank 0 prints and writes, per run:
  - seconds per step (the slowest rank's) and the window's spread (interquartile range / median), tokens/s in
    all and per device, model and hardware TFLOP/s per device (the second counts recomputation), MFU with
    attention's causal score matrix counted in full (PaLM, TorchTitan) and halved (Megatron) against the device's
    peak (datasheet table on a GPU, a matmul measured now elsewhere), and MFU against the matmul peak measured
    in this run; peak memory per rank (max and min over ranks);
  - the time of a step by phase (forward, backward, tensor-, pipeline- and data-parallel communication,
    optimizer, data), averaged over ranks (``megalm.runtime.phases``; pipeline communication includes the
    bubble's waits);
  - in one process, beside it: a plain PyTorch loop over Hugging Face transformers' model of the same shape, and
    megalm at tp = 2 (``--tp``) spawned on this host with the tensor-parallel traffic it counted per step beside
    the formula 8 b s h (t-1)/t per layer and micro-batch (Korthikanti et al. 2022).
``--sweep KEY=V1,V2,...`` measures each value in turn (a layout key must fit the launched world), with a table
and a plot; ``--profile`` writes a PyTorch profiler trace per rank; ``--compare OLD.json`` runs the regression
gate after the run. Results: JSON and PNG under --out (default runs/bench-train).
"""
from __future__ import annotations

import argparse

import torch

from megalm.bench.harness import Timing, figure, measured_matmul_flops, save_plot, steady, write_result
from megalm.bench.train_measure import measure
from megalm.config import Config, ConfigError, load_config, resolve
from megalm.flops import flops_per_token, mfu
from megalm.runtime.phases import PHASES

GIB = 1024 ** 3


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_step_timing(cfg: Config, steps: int, warmup: int) -> Timing | None:
    """A plain PyTorch loop (AdamW, clipping, autocast) over transformers' model of the same shape."""
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


def _tp_worker(rank, world, cfg_dict, steps, warmup, breakdown_steps, queue):
    from megalm.parallel.parallelize import build_chunks
    from megalm.parallel.tensor.comm import TP_KINDS, CommStats
    from megalm.runtime import discover, finish, start

    cfg = resolve(Config.from_dict(cfg_dict), world)
    rt = start(cfg, discover())
    result = measure(cfg, rt, steps, warmup, breakdown_steps)
    # Count one step's tensor-parallel traffic on a fresh model (the timing above ran without counting).
    chunk = build_chunks(cfg, rt.topo, torch.device("cpu"))[0]
    chunk.tp.comm = stats = CommStats()
    t = cfg.train
    for _ in range(t.global_batch_size // t.micro_batch_size):
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1))
        chunk(tokens[:, :-1], tokens[:, 1:]).backward()
    finish(rt)
    if rank == 0:
        queue.put((result, float(stats.total(*TP_KINDS)), float(sum(stats.elements.values()))))


def tp_result(cfg: Config, tp: int, steps: int, warmup: int, breakdown_steps: int) -> dict:
    """megalm at tensor-parallel size ``tp``, spawned on this host, and the traffic it counted per step."""
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    cfg_dict = {**cfg.to_dict(), "parallel": {**cfg.to_dict()["parallel"], "tp": tp, "dp": None, "pp": 1}}
    run_distributed(_tp_worker, tp, cfg_dict, steps, warmup, breakdown_steps, queue, timeout_s=1800)
    result, tp_elements, all_elements = queue.get()
    t, m = cfg.train, cfg.model
    formula = m.num_layers * 8 * t.global_batch_size * cfg.data.seq_len * m.hidden_size * (tp - 1) / tp
    return {"result": result, "comm": {"tp_elements_counted": tp_elements, "tp_elements_formula": formula,
                                       "all_elements_counted": all_elements}}


def layout_label(cfg: Config, world: int) -> str:
    p = cfg.parallel
    dp = world // (p.tp * p.pp)
    parts = [f"tp{p.tp}", f"pp{p.pp}" + (f"v{p.virtual_stages}" if p.virtual_stages > 1 else ""), f"dp{dp}"]
    if cfg.uses_deepspeed:
        parts.append(f"zero{p.zero_stage}")
    if p.sequence_parallel:
        parts.append("sp")
    if p.activation_checkpointing != "none":
        parts.append(f"rc={p.activation_checkpointing}")
    if cfg.train.compile:
        parts.append("compiled")
    return "megalm " + " ".join(parts)


def sweep_points(spec: str | None) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` -> [("KEY=V1", ["KEY=V1"]), ...]; no sweep -> one point without overrides."""
    if not spec:
        return [("", [])]
    key, sep, values = spec.partition("=")
    if not sep or not key or not values.strip(","):
        raise ConfigError(f"--sweep {spec!r}: write KEY=V1,V2,... (for example train.micro_batch_size=1,2,4)")
    return [(f"{key}={v}", [f"{key}={v}"]) for v in values.split(",") if v]


def _args(argv):
    ap = argparse.ArgumentParser(prog="megalm bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="a YAML file or a preset name")
    ap.add_argument("--vocab-size", type=int, default=8192, help="used when the config leaves it unset")
    ap.add_argument("--steps", type=int, default=10, help="steps in the steady window")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--breakdown-steps", type=int, default=3, help="steps timed phase by phase (0: none)")
    ap.add_argument("--data", choices=("random", "real"), default="random")
    ap.add_argument("--tp", type=int, nargs="*", default=[2],
                    help="in one process: tensor-parallel sizes also spawned on this host (0 for none)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--sweep", metavar="KEY=V1,V2,...", help="measure each value of one config key")
    ap.add_argument("--points", nargs="+", metavar="'K=V K=V'",
                    help="measure each of these override sets in turn (layouts of the launched world, say)")
    ap.add_argument("--profile", action="store_true", help="a profiler trace of the breakdown steps per rank")
    ap.add_argument("--memory", action="store_true",
                    help="one more step measuring the peak bytes of tensors held per rank (what megalm plan predicts)")
    ap.add_argument("--out", help="result folder (default runs/bench-train)")
    ap.add_argument("--compare", metavar="OLD.json", help="an earlier result: the regression gate after this run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)           # overrides may come before or after the options
    if args.steps < 1 or args.warmup < 0 or args.breakdown_steps < 0:
        raise ConfigError(f"megalm bench train: --steps {args.steps} must be >= 1, --warmup {args.warmup} and "
                          f"--breakdown-steps {args.breakdown_steps} >= 0")
    return args


def main(argv=None) -> int:
    from megalm.bench.harness import device_peak_flops, output_dir
    from megalm.parallel.topology import build_topology
    from megalm.runtime import discover, finish, start

    args = _args(argv)
    info = discover()
    if args.sweep and args.points:
        raise ConfigError("megalm bench train: give --sweep or --points, not both")
    points = [(p, p.split()) for p in args.points] if args.points else sweep_points(args.sweep)
    configs = []
    for _, overrides in points:              # every point resolved (and refused) before any work starts
        loaded = load_config(args.config, args.overrides + overrides)
        if loaded.model.vocab_size is None:
            loaded.set("model.vocab_size", args.vocab_size)
        configs.append(resolve(loaded, info.world_size))
    rt = start(configs[0], info)
    device = rt.device
    profile_dir = str(output_dir("train", args.out) / "profile") if args.profile else None
    runs = {}
    for (point, _), cfg in zip(points, configs):
        p = cfg.parallel
        topo = rt.topo if cfg.parallel == configs[0].parallel else build_topology(p.tp, p.pp, p.dp,
                                                                                  p.sequence_parallel)
        name = layout_label(cfg, info.world_size) + (f" {point}" if point else "")
        runs[name] = (cfg, measure(cfg, rt, args.steps, args.warmup, args.breakdown_steps, args.data,
                                   profile_dir, topo, args.memory), info.world_size)
    comm = {}
    if info.world_size == 1 and not args.sweep and not args.points:
        if not args.no_baseline:
            hf = hf_step_timing(configs[0], args.steps, args.warmup)
            if hf is not None:
                runs["transformers + torch loop"] = (configs[0], {"timing": hf}, 1)
        for tp in [t for t in args.tp if t > 1]:
            spawned = tp_result(configs[0], tp, args.steps, args.warmup, args.breakdown_steps)
            comm[tp] = spawned["comm"]
            runs[f"megalm tp{tp} spawned"] = (resolve(_with_tp(configs[0], tp), tp), spawned["result"], tp)
    finish(rt)
    if info.rank != 0:
        return 0
    # Measured now, in a warm process (a cold first matmul on a CPU reads several times slower).
    measured_peak = measured_matmul_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    peak, peak_source = device_peak_flops(device, configs[0].train.precision)
    if device.type != "cuda":
        peak, peak_source = measured_peak, f"{peak_source.split(' matmul')[0]} matmul, this run"
    return report(args, runs, comm, device, info.world_size, peak, peak_source, measured_peak, profile_dir)


def _with_tp(cfg: Config, tp: int) -> Config:
    out = cfg.mutable_copy()
    out.set("parallel.tp", tp)
    out.set("parallel.dp", None)
    return out


def row_of(cfg: Config, result: dict, devices: int, peak: float, measured_peak: float) -> dict:
    """One run's figures on ``devices`` devices: rates, FLOPs, MFU both ways, memory, breakdown fractions."""
    timing = result["timing"]
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_token = flops_per_token(cfg.model, cfg.data.seq_len, cfg.parallel.activation_checkpointing)
    rate = tokens / timing.median_s
    per_device = rate / devices
    row = {"seconds_per_step": timing.median_s, "spread": timing.spread, "steps": timing.calls,
           "devices": devices, "tokens_per_s": rate, "tokens_per_s_per_device": per_device,
           "tflops_per_device": per_device * per_token.model / 1e12,
           "hardware_tflops_per_device": per_device * per_token.hardware / 1e12,
           "mfu": mfu(per_device, per_token, peak), "mfu_causal": mfu(per_device, per_token, peak, causal=True),
           "mfu_measured_peak": mfu(per_device, per_token, measured_peak)}
    for key in ("peak_memory_max", "peak_memory_min", "peak_tensor_bytes_max", "peak_tensor_bytes_min", "loss_first",
                "loss_last"):
        if result.get(key) is not None:
            row[key] = result[key]
    if result.get("breakdown"):
        b = result["breakdown"]
        row["breakdown_s"] = b
        row["breakdown_fraction"] = {k: v / b["step"] for k, v in b.items() if k != "step"}
    return row


def report(args, runs, comm, device, world, peak, peak_source, measured_peak, profile_dir) -> int:
    rows = {name: row_of(cfg, result, devices, peak, measured_peak) for name, (cfg, result, devices) in runs.items()}
    first = next(iter(runs.values()))[0]
    per_token = flops_per_token(first.model, first.data.seq_len, first.parallel.activation_checkpointing)
    print(f"device {device} x {world} ({torch.get_num_threads()} threads/rank); peak {peak / 1e12:.4g} TFLOP/s "
          f"({peak_source}); matmul measured now {measured_peak / 1e12:.4g} TFLOP/s; "
          f"{first.train.global_batch_size * first.data.seq_len} tokens/step; {per_token.model / 1e6:.2f} "
          f"MFLOP/token")
    print("MFU counts attention's causal score matrix in full (PaLM, TorchTitan); MFU-causal counts half (Megatron); "
          "MFU-meas. is against the matmul measured now; spread = interquartile range / median of the window")
    print(f"{'run':36s} {'s/step':>8s} {'spread':>7s} {'tokens/s':>10s} {'tok/s/dev':>9s} {'TFLOP/s':>8s} "
          f"{'HW TF/s':>8s} {'MFU':>6s} {'MFU-c':>6s} {'MFU-meas':>8s} {'peak GiB':>8s}")
    for name, r in rows.items():
        memory = f"{r['peak_memory_max'] / GIB:8.2f}" if "peak_memory_max" in r else f"{'-':>8s}"
        print(f"{name:36s} {r['seconds_per_step']:8.3f} {r['spread']:7.1%} {r['tokens_per_s']:10,.0f} "
              f"{r['tokens_per_s_per_device']:9,.0f} {r['tflops_per_device']:8.4f} "
              f"{r['hardware_tflops_per_device']:8.4f} {r['mfu']:6.1%} {r['mfu_causal']:6.1%} "
              f"{r['mfu_measured_peak']:8.1%} {memory}")
    for name, r in rows.items():
        if "peak_tensor_bytes_max" in r:
            high, low = r["peak_tensor_bytes_max"] / 2**20, r["peak_tensor_bytes_min"] / 2**20
            print(f"{name}: tensors held at the step's peak, per rank (less those alive before the model): "
                  f"max {high:,.1f} MiB, min {low:,.1f} MiB")
    for name, r in rows.items():
        if "breakdown_fraction" in r:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in r["breakdown_fraction"].items() if v >= 0.005)
            print(f"{name}: step by phase ({r['breakdown_s']['step']:.3f} s, mean over ranks, "
                  f"{args.breakdown_steps} steps): {parts}")
    for tp, c in comm.items():
        print(f"tp={tp}: tensor-parallel elements per rank per step: counted {c['tp_elements_counted']:,.0f}, formula "
              f"{c['tp_elements_formula']:,.0f} (plus {c['all_elements_counted'] - c['tp_elements_counted']:,.0f} "
              f"in embedding, LM head, loss and replicated-gradient reductions)")
    result = {"device": str(device), "world_size": world, "peak_flops": peak, "peak_source": peak_source,
              "measured_peak_flops": measured_peak, "rows": rows, "tp_comm": comm, "sweep": args.sweep,
              "figures": {f"{name} tokens/s": figure(r["tokens_per_s"], r["spread"], "higher")
                          for name, r in rows.items()}}
    path = write_result("train", result, args.out, context={"config": first.to_dict(), "steps": args.steps,
                                                             "warmup": args.warmup, "data": args.data},
                        device=device)
    plot = save_plot(lambda fig, axes: _draw(axes, result), path.with_suffix(".png"), figsize=(11, 3.8), ncols=2)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    if profile_dir:
        print(f"profiler traces: {profile_dir}/trace_rank*.json (open in https://ui.perfetto.dev or "
              f"chrome://tracing)")
    if args.compare:
        from megalm.bench.compare import main as compare

        return compare([str(path), args.compare])
    return 0


def _draw(axes, result: dict) -> None:
    rows = result["rows"]
    names = list(rows)
    left, right = axes
    if result["sweep"]:
        key = result["sweep"].partition("=")[0]
        values = [n.rpartition("=")[2] for n in names]
        left.plot(values, [rows[n]["tokens_per_s"] for n in names], "o-")
        left.set_xlabel(key)
        left.set_ylabel("tokens/s")
        right.plot(values, [rows[n].get("loss_last", float("nan")) for n in names], "o-")
        right.set_xlabel(key)
        right.set_ylabel("loss at the end of the window")
    else:
        left.barh(names, [rows[n]["tokens_per_s"] for n in names])
        left.set_xlabel("tokens/s")
        timed = [n for n in names if "breakdown_fraction" in rows[n]]
        base = [0.0] * len(timed)
        for phase in (*PHASES, "other"):
            widths = [rows[n]["breakdown_fraction"].get(phase, 0.0) for n in timed]
            right.barh(timed, widths, left=base, label=phase)
            base = [b + w for b, w in zip(base, widths)]
        right.set_xlabel("share of a step")
        right.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    left.set_title(f"training throughput on {result['device']} x {result['world_size']}")
