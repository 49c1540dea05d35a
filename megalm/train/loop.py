"""``megalm train``: the loop. Resolved config -> runtime -> engine (model chunks) -> schedule per step ->
metrics, evaluation and checkpoints. Rerunning on the same run directory resumes exactly where it stopped."""
from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from megalm.bench.harness import device_peak_flops
from megalm.checkpoint.format import CheckpointError, checkpoints_root, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader, open_readable
from megalm.checkpoint.save import SnapshotBuffers
from megalm.config import Config, ConfigError, resolve
from megalm.config.rules import lora_targets
from megalm.data.blend import BlendedDataset, check_resumed_blend, open_split, tokenizer_prefix
from megalm.data.chat_dataset import inputs_and_targets
from megalm.data.dataset import BatchSampler, eval_batches
from megalm.data.tokenizer import dataset_tokenizer, tokenizer_path
from megalm.engine import build_engine
from megalm.engine.optim import lr_at
from megalm.flops import document_squares, flops_per_token
from megalm.parallel.pipeline.p2p import P2P, activation_shape
from megalm.runtime import Runtime, discover, faults, finish, start
from megalm.runtime.signals import DesyncError, StopRequest, agree_to_stop, install, over_budget, uninstall
from megalm.runtime.stragglers import find_straggler, report
from megalm.train.checkpointing import lora_base_of, restore, save
from megalm.train.finetune import check_tokenizer
from megalm.train.metrics import MetricsLogger, plot_loss_curve
from megalm.train.step import NonFiniteLoss, evaluate, train_step


def find_source(cfg: Config) -> tuple[Path | None, bool]:
    """The checkpoint this run starts from: an explicit step folder of this run (checkpoint.load=RUN_DIR/
    checkpoints/step_N: resume there), else its own latest (resume), else checkpoint.load's (True: a new start)."""
    load = Path(cfg.checkpoint.load) if cfg.checkpoint.load else None
    if load is not None and load.parent.resolve() == checkpoints_root(cfg.train.run_dir).resolve():
        chosen = latest_checkpoint(load)
        if chosen is None:
            raise ConfigError(f"checkpoint.load={load}: not a committed checkpoint of this run")
        return chosen, False
    notes: list = []
    own = latest_checkpoint(cfg.train.run_dir, notes)
    for note in notes if discover().rank == 0 else ():
        print(f"checkpoint: {note}", flush=True)
    if own is not None or cfg.checkpoint.load is None:
        return own, False
    loaded = latest_checkpoint(cfg.checkpoint.load)
    if loaded is None:
        raise ConfigError(f"checkpoint.load={cfg.checkpoint.load}: no committed megalm checkpoint there")
    return loaded, True


def prepare(cfg: Config) -> tuple[Config, Runtime, CheckpointReader | None, bool]:
    """Resolve the config (before any process group), then bring the runtime up."""
    info = discover()
    source, from_load = find_source(cfg)
    say = print if info.rank == 0 else (lambda line: None)
    reader = open_readable(source, say) if source else None    # its files are verified per rank by restore()
    data_tokenizer = dataset_tokenizer(tokenizer_prefix(cfg.data))
    if reader is not None:
        check_tokenizer(reader, data_tokenizer, tokenizer_prefix(cfg.data))
    cfg = resolve(cfg, info.world_size, checkpoint=(reader.folder, reader.manifest["config"]) if reader else None,
                  adopt_model=from_load, tokenizer=data_tokenizer)
    lora_base_of(cfg, reader)                         # a LoRA run needs a base: refused before anything starts
    return cfg, start(cfg, info), reader, from_load


def train(cfg: Config) -> dict:
    """Train to ``train.steps``; returns the final metrics (on every rank)."""
    cfg, rt, reader, from_load = prepare(cfg)
    try:
        return _train(cfg, rt, reader, from_load)
    except RuntimeError as error:          # a collective failed: the watchdog names the rank that is gone
        if rt.watchdog is not None and not isinstance(error, DesyncError):
            rt.watchdog.explain(error)
        raise


def _train(cfg: Config, rt: Runtime, reader, from_load: bool) -> dict:
    topo, t = rt.topo, cfg.train
    engine = build_engine(cfg, topo, rt.device, init=reader is None)
    comm = count_tensor_parallel_traffic(engine.chunks)
    say = print if rt.is_logging_rank else (lambda line: None)
    weights_only = from_load and cfg.checkpoint.load_weights_only
    step, consumed, saved_data, reader = restore(engine, reader, weights_only, say) if reader else (0, 0, {}, None)
    lora_base = lora_base_of(cfg, reader)
    first_step, progress = step, {"step": step}         # the step the closures below save and log at
    data = {split: open_split(cfg.data, split, cfg.model.vocab_size) for split in ("train", "valid", "test")}
    eval_share = max(1, t.eval_samples // (t.micro_batch_size * topo.dp)) * t.micro_batch_size * topo.dp
    for split in ("valid", "test"):          # a split too small to evaluate is refused before the first step
        eval_batches(data[split], t.micro_batch_size, eval_share)
    blend = data["train"] if isinstance(data["train"], BlendedDataset) else None
    if blend is not None:
        check_resumed_blend(blend, saved_data.get("blend"), consumed)
        for line in blend.epochs_warning(t.steps * t.global_batch_size):
            say(line)
    sampler = BatchSampler(data["train"], t.global_batch_size, t.micro_batch_size, topo.dp_rank, topo.dp, consumed)
    p2p = P2P(topo, activation_shape(t.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size, topo),
              engine.activation_dtype, rt.device, num_chunks=len(engine.chunks))
    per_token = flops_per_token(cfg.model, cfg.data.seq_len, cfg.parallel.activation_checkpointing)
    peak, peak_source = device_peak_flops(rt.device, t.precision) if rt.is_logging_rank else (0.0, "")
    log = MetricsLogger(t.run_dir, rt.is_logging_rank, cfg.logging.tensorboard, t.steps, per_token,
                        rt.topo.world_size, peak, cfg.logging.wandb, cfg.to_dict())
    if rt.is_logging_rank:
        _announce(cfg, rt, engine, step, reader.folder if reader else None)
        print(f"MFU: model FLOPs (6N + attention; 'MFU' counts the causal score matrix in full as PaLM and TorchTitan "
              f"do, 'causal-halved' counts half as Megatron does; 'hfu' in metrics.jsonl adds recomputation) against "
              f"{peak / 1e12:.3g} TFLOP/s per device ({peak_source})", flush=True)
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(t.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def run_eval(split: str, record: bool = True) -> float:
        batches = list(eval_batches(data[split], t.micro_batch_size, eval_share))
        mine = [b for i, b in enumerate(batches) if i % topo.dp == topo.dp_rank]
        loss = evaluate(engine, p2p, [b.to(rt.device) for b in mine], topo)
        log.evaluation(progress["step"], split, loss, sum(b.shape[0] for b in batches), record)
        return loss

    asynchronous = cfg.checkpoint.async_save and not cfg.checkpoint.deepspeed_native   # DeepSpeed's own: collective
    snapshot_buffers = SnapshotBuffers()                 # host copies for asynchronous saves, reused

    def settle(wait: bool = True) -> None:
        """Commit the save in flight: when ``wait``, now; else only if every rank's writing is done (collective:
        called at the same step boundaries on every rank)."""
        pending = progress.get("pending_save")
        if pending is None or not (wait or _all_done(pending, rt.device)):
            return
        progress["pending_save"] = None
        rt.note(f"committing the checkpoint of step {pending.job.step}", progress["step"])
        if _saved_or_said(pending.finish, cfg, rt, progress) is not None:
            log.log({"step": pending.job.step, "checkpoint_blocked_s": pending.blocked_s + pending.waited_s,
                     "checkpoint_s": time.perf_counter() - pending.job.started, "checkpoint_async": True})

    def checkpoint(final: bool = False) -> None:
        settle()                                   # at most one save in flight
        rt.note(f"checkpoint save of step {progress['step']}", progress["step"])
        background = asynchronous and not final
        start = lambda: save(engine, cfg, topo, progress["step"], sampler.consumed_samples,  # noqa: E731
                             tokenizer_path(tokenizer_prefix(cfg.data)),
                             blend and blend.state(sampler.consumed_samples), background, lora_base,
                             snapshot_buffers)
        began = time.perf_counter()
        progress["pending_save"] = _saved_or_said(start, cfg, rt, progress)
        if progress["pending_save"] is None and not background:
            seconds = time.perf_counter() - began
            log.log({"step": progress["step"], "checkpoint_blocked_s": seconds, "checkpoint_s": seconds,
                     "checkpoint_async": False})

    def roll_back(bad_step: int) -> int:
        settle()                                   # the save in flight is the newest checkpoint to go back to
        return _roll_back(cfg, engine, sampler, log, progress, bad_step, say)

    request = StopRequest()
    handlers = install(request, rt.info.rank)
    try:
        try:
            stopped = _steps(cfg, rt, engine, sampler, p2p, log, comm, progress, request, run_eval,
                             (checkpoint, settle), roll_back)
        except NonFiniteLoss:           # agreed on every rank: the save in flight is still committed
            settle()
            raise
        settle()
    finally:
        uninstall(handlers)
    step = progress["step"]
    result = {"step": step}
    if stopped:
        checkpoint(final=True)
        if rt.is_logging_rank:
            print(f"megalm: stopped at step {step} ({request.reason or 'another rank was asked to stop'}); "
                  f"checkpoint saved: rerun the same command to resume", flush=True)
            _mark_stopped(step, request)
        result.update(stopped=request.reason or "requested", exit_status=request.exit_status())
    elif step < t.steps:      # stopped early on purpose (train.stop_at_step): the next run resumes here
        checkpoint(final=True)
    else:
        trained = step > first_step or reader is None or from_load      # else: a finished run, rerun
        result["val_loss"] = run_eval("valid", record=trained)
        result["test_loss"] = run_eval("test", record=trained)
        if trained:
            checkpoint(final=True)
        if rt.is_logging_rank and cfg.logging.plot:
            print(f"loss curve: {plot_loss_curve(t.run_dir)}")
    result["loss"] = log.last_loss
    log.close()
    finish(rt)
    return result


def _steps(cfg, rt, engine, sampler, p2p, log, comm, progress, request, run_eval, saves, roll_back) -> bool:
    """Train from ``progress["step"]`` to train.stop_at_step (or train.steps), keeping ``progress`` current;
    returns whether the run stopped on request. At every step boundary the ranks agree whether a signal or the
    time budget asks them to stop."""
    t, topo, step = cfg.train, rt.topo, progress["step"]
    checkpoint, settle = saves
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    last = min(t.steps, t.stop_at_step or t.steps)
    slowest = save_seconds = busy = 0.0
    window_start, clock, suspects = step + 1, {}, []
    recent = collections.deque(maxlen=t.loss_spike_window)
    while step < last:
        torch.manual_seed(t.seed + step)     # dropout masks depend on (seed, step) only: exact resume
        begin = time.perf_counter()
        rt.note(f"training step {step + 1} (data, forward/backward, optimizer)", step, bounded=True,
                slowest_step=slowest)
        faults.strike("step_start", rt.info.rank, step + 1)
        micro = [b.to(rt.device) for b in sampler.next_batch()]
        lr = lr_at(step, cfg)
        if comm is not None:
            comm.reset()
        poison = "loss" if faults.strike("loss", rt.info.rank, step + 1) else \
            "gradient" if faults.strike("gradient", rt.info.rank, step + 1) else ""
        try:
            loss, norm = train_step(engine, p2p, cfg.schedule, micro, topo, lr, step + 1, clock,
                                    "skip" if t.on_non_finite == "skip" else "stop", poison)
        except NonFiniteLoss as error:
            if t.on_non_finite != "rollback":
                raise
            step = roll_back(error.step)             # every rank: the same checkpoint, the same new position
            continue
        step = progress["step"] = step + 1
        _watch_loss(log, step, loss, norm, recent, t.loss_spike_factor, progress)
        seconds = time.perf_counter() - begin
        slowest, busy = max(slowest, seconds), busy + clock["schedule_done"] - begin
        if step % t.log_interval == 0 or step == last:
            if _check_stragglers(cfg, rt, log, busy, window_start, step, suspects):
                busy, window_start = 0.0, step + 1
        log.train_step(step, loss, lr, norm, tokens_per_step / seconds,
                       print_line=step % t.log_interval == 0 or step == t.steps or step == 1 or math.isinf(norm),
                       loss_scale=engine.loss_scale, comm=comm, flops=packed_flops(cfg, micro, topo, rt.device))
        if isinstance(sampler.dataset, BlendedDataset) and (step % t.log_interval == 0 or step == last):
            log.data_sources(step, sampler.dataset.names, sampler.dataset.counts(sampler.consumed_samples))
        if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:   # the last is evaluated below
            rt.note(f"evaluation after step {step}", step)
            run_eval("valid")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < last:
            started = time.perf_counter()
            checkpoint()
            save_seconds = time.perf_counter() - started
        settle(wait=False)                             # commit a background save once every rank has written it
        rt.note("agreeing whether to stop", step, bounded=True, slowest_step=slowest)
        margin = max(t.time_limit_margin, 2 * slowest + save_seconds)
        if faults.strike("stop_agreement", rt.info.rank, step):
            continue
        over_budget(request, t.time_limit, margin)          # sets request.reason when the budget is spent
        if step < last and agree_to_stop(request, rt.device, step):
            return True
    return False


def _all_done(pending, device) -> bool:
    """Whether every rank's background writing has finished (one all-reduce of one element)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return pending.done()
    flag = torch.tensor([1.0 if pending.done() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _saved_or_said(action, cfg: Config, rt, progress: dict):
    """Run a save (or its commit); a failure, the same on every rank, stops the run or is said and counted."""
    try:
        return action()
    except CheckpointError as error:          # the same on every rank; nothing was committed
        if cfg.checkpoint.on_error == "stop":
            raise
        progress["failed_saves"] = progress.get("failed_saves", 0) + 1
        if rt.is_logging_rank:
            print(f"megalm: {error}; continuing without it (checkpoint.on_error=continue; "
                  f"{progress['failed_saves']} failed so far)", file=sys.stderr, flush=True)
        return None


def _watch_loss(log, step: int, loss: float, norm: float, recent, factor: float, progress: dict) -> None:
    """Say a skipped step (train.on_non_finite=skip) and flag a loss spike against the recent median."""
    if not math.isfinite(loss) or math.isnan(norm):       # (fp16's overflow skip reports inf, not NaN)
        progress["skipped_steps"] = progress.get("skipped_steps", 0) + 1
        log.log({"step": step, "skipped_non_finite": True})
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient (the loss was finite)"
        log.say(f"step {step}: non-finite {what} on some rank; every rank dropped its gradients and took no "
                f"optimizer step (train.on_non_finite=skip; {progress['skipped_steps']} skipped so far)")
        return
    if factor and len(recent) == recent.maxlen:
        median = statistics.median(recent)
        if median > 0 and loss > factor * median:
            log.log({"step": step, "loss_spike": loss / median})
            log.say(f"step {step}: loss spike: {loss:.4f} is {loss / median:.2f}x the median of the last "
                    f"{len(recent)} steps ({median:.4f}; train.loss_spike_factor={factor:g})")
    recent.append(loss)


def _roll_back(cfg: Config, engine, sampler, log, progress: dict, bad_step: int, say) -> int:
    """train.on_non_finite=rollback: reload the latest checkpoint and skip the data from it up to ``bad_step``
    (that data is not trained on); returns the step to continue after."""
    source = latest_checkpoint(cfg.train.run_dir)
    rolled = progress.setdefault("rollbacks", 0)
    if source is None or rolled >= 3:
        why = "no checkpoint to roll back to" if source is None else "3 rollbacks already"
        raise NonFiniteLoss(f"non-finite loss at step {bad_step} and {why} (train.on_non_finite=rollback): "
                            f"stopping before the optimizer step", bad_step)
    back_to, consumed, _, _ = restore(engine, CheckpointReader(source, verify=False), False, say)
    sampler.load_state_dict({"consumed_samples": consumed + (bad_step - back_to) * cfg.train.global_batch_size})
    progress["rollbacks"], progress["step"] = rolled + 1, bad_step
    log.log({"step": bad_step, "rolled_back_to": back_to})
    say(f"step {bad_step}: non-finite loss; rolled back to the checkpoint of step {back_to} and skipped the data "
        f"of steps {back_to + 1}-{bad_step} (train.on_non_finite=rollback)")
    return bad_step


def _check_stragglers(cfg, rt, log, busy: float, first_step: int, last_step: int, suspects: list) -> bool:
    """Judge the window (returns False to extend it); name a rank that was the straggler twice in a row."""
    factor = cfg.parallel.straggler_factor
    straggler, judged = find_straggler(busy, factor, rt.device)
    if not judged:
        return False
    previous = suspects[-1] if suspects else None
    suspects[:] = [straggler]
    if straggler is not None and previous is not None and previous.rank == straggler.rank:
        report(straggler, rt.info.rank, rt.info.local_rank, first_step, last_step, factor)
        log.log({"step": last_step, "straggler_rank": straggler.rank, "straggler_ratio": round(straggler.ratio, 3)})
    return True


def _mark_stopped(step: int, request: StopRequest) -> None:
    """Tell a batch script (MEGALM_STOP_FILE, set by launch_scripts/slurm/common.sh) that this run stopped with a
    checkpoint and should be requeued: launchers such as torchrun and mpirun do not pass exit status 75 through."""
    marker = os.environ.get("MEGALM_STOP_FILE")
    if marker:
        Path(marker).write_text(f"stopped at step {step} with a checkpoint ({request.reason or 'requested'})\n")


def packed_flops(cfg: Config, micro, topo, device):
    """The step's FLOPs per token when its samples pack documents (attention from the documents' own lengths,
    summed over the data-parallel ranks: one two-number all-reduce); None for ordinary samples."""
    segments = [inputs_and_targets(b)[2] for b in micro]
    if segments[0] is None:
        return None
    import torch.distributed as dist

    totals = torch.tensor([sum(document_squares(s) for s in segments), sum(s.numel() for s in segments)],
                          dtype=torch.float64, device=device)
    if topo.dp_group is not None:
        dist.all_reduce(totals, group=topo.dp_group)
    return flops_per_token(cfg.model, cfg.data.seq_len, cfg.parallel.activation_checkpointing,
                           attention_span=float(totals[0] / totals[1]))


def count_tensor_parallel_traffic(chunks):
    """At tp > 1, one CommStats shared by every chunk's tensor-parallel handle (None at tp = 1): each step's
    elements sent go into metrics.jsonl beside the loss."""
    if chunks[0].tp.size == 1:
        return None
    from megalm.parallel.tensor import CommStats

    stats = CommStats()
    for chunk in chunks:
        chunk.tp.comm = stats
    return stats


def _announce(cfg: Config, rt: Runtime, engine, step: int, source) -> None:
    p = cfg.parallel
    print(f"megalm train: world {rt.topo.world_size} = tp {p.tp} x pp {p.pp} x dp {rt.topo.dp}"
          f"{' (sequence parallel)' if p.sequence_parallel else ''}, schedule {cfg.schedule}, "
          f"engine {'deepspeed zero-' + str(p.zero_stage) if cfg.uses_deepspeed else 'native'}, "
          f"{cfg.train.precision}, device {rt.device}", flush=True)
    print(f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size}; "
          f"{engine.parameter_count() / 1e6:.2f}M parameters on rank 0 (its tensor-parallel slice of its "
          f"pipeline stage)", flush=True)
    print("kernels: " + ", ".join(f"{op} {impl}" for op, impl in engine.chunks[0].ops.impls.items()), flush=True)
    if cfg.lora.rank:
        trainable = sum(getattr(q, "ds_numel", q.numel()) for c in engine.chunks for q in c.parameters()
                        if q.requires_grad)
        print(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(lora_targets(cfg))}: "
              f"{trainable / 1e6:.3f}M trainable parameters on rank 0 "
              f"({100 * trainable / max(engine.parameter_count(), 1):.2f}%), the base frozen", flush=True)
    if source:
        print(f"{'starting from' if step == 0 else 'resuming from'} {source} at step {step}", flush=True)
