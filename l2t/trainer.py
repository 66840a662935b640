"""What the Hugging Face `Trainer` gets from L2T: the weighted loss, its logging, and the run folder.

`L2TTrainer` changes only the loss: per-token weights, normalised by the number
of tokens in the loss across the accumulated batch and all processes, and the
response and instruction losses logged separately (the response loss is
comparable across loss modes, the total is not). `RunFolderCallback` writes
metrics.jsonl and status.json; `StopOnSignal` turns SIGTERM/SIGINT into "save a
checkpoint, then stop".
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from l2t import runs
from l2t.loss import labelled_token_loss


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class L2TTrainer(Trainer):
    """HF Trainer with the per-token weighted L2T loss and split loss logging."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, lengths: list[int] | None = None, group_by_length: bool = False, labelled_logits_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._lengths = lengths
        self._group_by_length = group_by_length
        self.labelled_logits_only = labelled_logits_only
        self._parts = torch.zeros(6, dtype=torch.float64)  # resp sum, resp n, instr sum, instr n, tokens, samples

    def _get_train_sampler(self, train_dataset=None):
        if self._group_by_length and self._lengths:
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=self._lengths)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_loss, in_loss, outputs = labelled_token_loss(model, inputs, self.labelled_logits_only)
        weights, kinds = inputs["loss_weights"][:, 1:][in_loss], inputs["loss_kinds"][:, 1:][in_loss]
        count = num_items_in_batch if num_items_in_batch is not None else in_loss.sum()
        loss = (token_loss * weights).sum() / count
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it for a global token mean
        with torch.no_grad():
            detached = token_loss.detach().double()
            self._parts += torch.stack([
                (detached * (kinds == 2)).sum(), (kinds == 2).sum().double(),
                (detached * (kinds == 1)).sum(), (kinds == 1).sum().double(),
                inputs["attention_mask"].sum().double(), torch.tensor(float(in_loss.shape[0]), dtype=torch.float64),
            ]).cpu()  # fmt: skip
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            parts = self._parts.to(self.args.device)
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts, reduction="sum")
            parts = parts.cpu()
            if parts[1] > 0:
                logs["response_loss"] = round(float(parts[0] / parts[1]), 6)
            if parts[3] > 0:
                logs["instruction_loss"] = round(float(parts[2] / parts[3]), 6)
            logs["tokens"] = int(parts[4])
            logs["samples"] = int(parts[5])
            self._parts.zero_()
        super().log(logs, *args, **kwargs)


class RunFolderCallback(TrainerCallback):
    """metrics.jsonl (one line per logging step) and status.json, written by the main process."""

    def __init__(self, run_dir: Path, device: str):
        self.run_dir = run_dir
        self.device = device
        self.last_time = time.time()
        self.started = time.time()

    def status(self, state: str, **extra) -> None:
        if is_main_process():
            runs.write_status(self.run_dir, state, **extra)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.time()
        if state.global_step and is_main_process():
            # The step the Trainer read back from the checkpoint, not the one asked for: a resume that restarts shows.
            print(f"resumed at step {state.global_step} of {state.max_steps}", flush=True)
        self.status("running", step=state.global_step, total=state.max_steps, started=self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.time()
        elapsed = max(now - self.last_time, 1e-9)
        self.last_time = now
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "response_loss", "instruction_loss", "learning_rate", "grad_norm"):
            if key in logs:
                row[key] = logs[key]
        row["samples_per_s"] = round(logs.get("samples", 0) / elapsed, 3)
        row["tokens_per_s"] = round(logs.get("tokens", 0) / elapsed, 1)
        if self.device == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        row["time"] = round(now, 3)
        runs.append_metrics(self.run_dir, row)
        remaining = (state.max_steps - state.global_step) * (now - self.started) / max(state.global_step, 1)
        self.status("running", step=state.global_step, total=state.max_steps, started=self.started, eta_s=round(remaining, 1))


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT ends the run cleanly: save a checkpoint at the end of this step, then stop."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _request(self, signum, frame):
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._request)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
