"""Where numbers go: the console (with tokens/s and ETA), RUN_DIR/metrics.jsonl, TensorBoard, a loss-curve PNG.

Only the rank that owns the logger writes; the others get a logger whose methods do nothing.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path

from megalm.flops import mfu


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, total_steps: int = 0,
                 flops=None, devices: int = 1, peak_flops: float = 0.0, wandb_project: str | None = None,
                 run_config: dict | None = None):
        """``flops``: megalm.flops.FlopsPerToken; with ``devices`` and the device's ``peak_flops`` it gives each
        step's TFLOP/s per device (model and hardware) and MFU in both attention conventions. ``wandb_project``:
        also send every record to Weights & Biases (``run_config`` as the run's config)."""
        self.enabled, self.total_steps = enabled, total_steps
        self.flops, self.devices, self.peak_flops = flops, devices, peak_flops
        self.run_dir = Path(run_dir)
        self.start_time, self.start_step = time.perf_counter(), None
        self.writer, self.last_loss, self.wandb = None, None, None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_project:
            self.wandb = start_wandb(wandb_project, self.run_dir, run_config or {})
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: jsonl and the plot still carry everything
                self.writer = None

    def say(self, line: str) -> None:
        """A line on the logging rank's console."""
        if self.enabled:
            print(line, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(_numbers(record), step=record.get("step", 0))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record.get("step", 0))

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                   print_line: bool, loss_scale: float | None = None, comm=None, flops=None) -> None:
        """``flops``: this step's FlopsPerToken when it differs from the run's (packed documents)."""
        self.last_loss = loss
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        rate = ""
        if self.flops is not None:
            record.update(self._rates(tokens_per_s / self.devices, flops or self.flops))
            rate = f" | {record['tflops_per_device']:.3g} TFLOP/s/device"
            if self.peak_flops:
                rate += f" | MFU {record['mfu']:.1%} (causal-halved {record['mfu_causal']:.1%})"
        if comm is not None:          # this rank's tensor-parallel traffic this step (ring model, elements)
            from megalm.parallel.tensor import TP_KINDS

            record["tp_comm_elements"] = float(comm.total())
            record["tp_layer_comm_elements"] = float(comm.total(*TP_KINDS))
        fp16 = ""
        if loss_scale is not None:      # fp16: the scale after this step; an inf norm means a skipped update
            record["loss_scale"] = loss_scale
            fp16 = f" | loss scale {loss_scale:g}" + (" (overflow: update skipped)" if math.isinf(grad_norm) else "")
        self.log(record)
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.perf_counter()
        if self.enabled and print_line:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(1, done) * (self.total_steps - step)
            print(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} "
                  f"| {tokens_per_s:,.0f} tok/s{rate} | ETA {_fmt(eta)}{fp16}", flush=True)

    def _rates(self, tokens_per_s_per_device: float, f) -> dict:
        """Model and hardware TFLOP/s per device; MFU with attention in full (PaLM, TorchTitan) and halved
        (Megatron), and hardware FLOPs utilisation (recomputation counted)."""
        n = tokens_per_s_per_device
        out = {"tflops_per_device": n * f.model / 1e12, "tflops_causal_per_device": n * f.model_causal / 1e12,
               "hardware_tflops_per_device": n * f.hardware / 1e12}
        if self.peak_flops:
            out.update(mfu=mfu(n, f, self.peak_flops), mfu_causal=mfu(n, f, self.peak_flops, causal=True),
                       hfu=n * f.hardware / self.peak_flops)
        return out

    def data_sources(self, step: int, names: list[str], counts) -> None:
        """Samples consumed so far from each source of a blend, logged and printed."""
        self.log({"step": step, "samples_per_source": dict(zip(names, map(int, counts)))})
        if self.enabled:
            total = max(1, int(sum(counts)))
            shares = ", ".join(f"{n} {int(c)} ({c / total:.1%})" for n, c in zip(names, counts))
            print(f"step {step:>6}/{self.total_steps} | samples per source: {shares}", flush=True)

    def evaluation(self, step: int, split: str, loss: float, samples: int, record: bool = True) -> None:
        """``record`` False: printed only (a finished run, rerun, evaluates again but adds no rows)."""
        ppl = math.exp(min(loss, 50.0))
        prefix = "val" if split == "valid" else split
        if record:
            self.log({"step": step, f"{prefix}_loss": loss, f"{prefix}_ppl": ppl})
        if self.enabled:
            note = "" if record else " (run already finished: not recorded again)"
            print(f"step {step:>6} | {split} loss {loss:.4f} | {split} perplexity {ppl:.2f} "
                  f"({samples} samples of the {split} split, train.eval_samples){note}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def start_wandb(project: str, run_dir: Path, config: dict):
    """A W&B run named after the run directory; its id is kept there (RUN_DIR/wandb_id), so a rerun that resumes
    training resumes the same W&B run. Offline (WANDB_MODE=offline) it writes under RUN_DIR/wandb."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=config)


def _numbers(record: dict) -> dict:
    """The numbers of a record for W&B, a nested mapping flattened one level (samples_per_source/NAME)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_loss_curve(run_dir, out_name: str = "loss_curve.png") -> Path:
    """Training loss (and validation loss) against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = {r["step"]: r["loss"] for r in records if "loss" in r}      # a resumed run overwrites its steps
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train loss", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"megalm: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / out_name
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
