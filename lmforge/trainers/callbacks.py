"""Trainer callbacks (the ``CALLBACKS`` registry, ``--callbacks``).

Entries are ``transformers.TrainerCallback`` classes, instantiated with no arguments:

- ``progress``: one tqdm bar over the optimizer steps (loss, lr, tokens/s, ETA) and eval results
  as lines; a plain log line every ``logging_steps`` when stderr is not a terminal. It replaces
  transformers' own ``ProgressCallback`` (remove that one from the Trainer).
- ``plot``: PNG curves in ``output_dir`` at the end of training (see ``plotting.py``).
- ``nan_guard``: stops training with a clear message when the logged loss turns NaN/inf.
- ``jsonl_logger``: appends every log dict to ``output_dir/logging.jsonl``.

``InterruptCallback`` is not a plugin: every training run gets one from ``run_training``. The first
Ctrl-C finishes the optimizer step, saves a checkpoint and stops; a second stops at once.

Only the main process (``state.is_world_process_zero``) prints or writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lmforge.registry import CALLBACKS

logger = logging.getLogger(__name__)

# objective metrics shown beside the loss (log key -> short name): DPO-style pairs, GRPO rollouts
_OBJECTIVE_KEYS = {"rewards/accuracies": "acc", "rewards/margins": "margin", "reward": "reward"}
# keys of transformers' log dicts that are bookkeeping, not worth a line on the console
_QUIET_KEYS = {"total_flos", "epoch", "step", "num_input_tokens_seen"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@CALLBACKS.register("progress")
class ProgressCallback(TrainerCallback):
    """One progress bar for the run: steps, loss, lr, tokens/s and ETA.

    Tokens/s comes from ``state.num_input_tokens_seen`` (the Trainer must track it:
    ``include_num_input_tokens_seen``); it is left out when that stays 0. Without a terminal
    (CI logs, ``nohup``) a redrawn bar would write thousands of lines, so the callback logs one
    line per ``on_log`` instead (every ``logging_steps``).
    """

    def __init__(self, use_bar: bool | None = None, stream: Any = None) -> None:
        self.stream = stream
        self.use_bar = use_bar
        self.bar = None
        self.eval_bar = None
        self.postfix: dict[str, str] = {}
        self._told_flat = self._told_all_flat = False
        self._step = 0

    def _tty(self) -> bool:
        stream = self.stream or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def _write(self, line: str) -> None:
        # printed, not logged: the progress output must show whatever the logging config is
        stream = self.stream or sys.stderr
        if self.bar is not None:
            from tqdm import tqdm
            tqdm.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def _throughput(self, state) -> float | None:
        tokens = state.num_input_tokens_seen - self._tokens0
        elapsed = time.monotonic() - self._t0
        return tokens / elapsed if tokens > 0 and elapsed > 0 else None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0 = time.monotonic(), state.global_step
        self._tokens0 = state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        if self.use_bar if self.use_bar is not None else self._tty():
            from tqdm import tqdm
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True, file=self.stream or sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        # tok/s is refreshed in on_log: the trainer reads its device-side token count at log lines only
        self.bar.set_postfix(self._ordered(), refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def _ordered(self) -> dict[str, str]:
        return {k: self.postfix[k] for k in ("loss", "lr", *_OBJECTIVE_KEYS.values(), "no-spread", "tok/s")
                if k in self.postfix}

    def _objective(self, logs: dict[str, Any]) -> None:
        """What the objective reports beside the loss: DPO's reward accuracy and margin, GRPO's reward and
        the groups whose samples all scored the same (zero advantage: they teach nothing)."""
        for key, short in _OBJECTIVE_KEYS.items():
            if isinstance(logs.get(key), (int, float)):
                self.postfix[short] = f"{logs[key]:.3g}"
        frac, groups = logs.get("frac_reward_zero_std"), logs.get("rollout/groups")
        if not isinstance(frac, (int, float)):
            return
        known = isinstance(groups, (int, float)) and groups > 0
        self.postfix["no-spread"] = f"{round(frac * groups)}/{int(groups)}" if known else f"{frac:.0%}"
        if frac > 0 and not self._told_flat:
            self._told_flat = True
            self._write(f"note: {self.postfix['no-spread']} GRPO groups had the same reward for every sample "
                        "(no-spread). Their advantages are 0, so they carry no learning signal; when every "
                        "group is like that the loss is 0 and nothing is learned. Warm-start with SFT, raise "
                        "--temperature or --num_generations, or use a reward that gives partial credit.")
        if frac >= 1 and not self._told_all_flat:
            self._told_all_flat = True
            self._write(f"note: no group had any reward spread in the steps logged at step {self._step}: "
                        "those steps learned nothing.")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None or eval_dataloader is None:
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:
                total = None
            from tqdm import tqdm
            self.eval_bar = tqdm(total=total, desc="eval", leave=False, dynamic_ncols=True,
                                 file=self.stream or sys.stderr)
        self.eval_bar.update(1)

    def _close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs or "learning_rate" in logs:
            self._step = state.global_step
            self._objective(logs)
            if "loss" in logs:
                self.postfix["loss"] = _fmt(logs["loss"])
            if "learning_rate" in logs:
                self.postfix["lr"] = f"{logs['learning_rate']:.3g}"
            if self.bar is not None:
                tps = self._throughput(state)
                if tps is not None:
                    self.postfix["tok/s"] = f"{tps:.0f}"
                self.bar.set_postfix(self._ordered())
            else:
                self._write(self._plain_line(state))
        else:  # eval results, the end-of-training summary, anything a plugin logs
            self._close_eval_bar()  # transformers logs eval metrics before on_evaluate
            shown = {k: _fmt(v) for k, v in logs.items()
                     if k not in _QUIET_KEYS and not (k.startswith("eval_") and k.endswith("_per_second"))}
            if shown:
                self._write(f"[step {state.global_step}] " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def _plain_line(self, state) -> str:
        done, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self._t0
        parts = [f"step {done}/{total}"] + [f"{k}={v}" for k, v in self._ordered().items() if k != "tok/s"]
        tps = self._throughput(state)
        if tps is not None:
            parts.append(f"tok/s={tps:.0f}")
        steps_here = done - self._step0
        if steps_here > 0 and total > done:
            parts.append(f"eta={_fmt_duration(elapsed / steps_here * (total - done))}")
        parts.append(f"elapsed={_fmt_duration(elapsed)}")
        return " ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        self._close_eval_bar()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """Ctrl-C during training: the first finishes the optimizer step, saves a checkpoint and stops; a second
    stops at once (``KeyboardInterrupt``). ``stop_message`` then says where it stopped, which checkpoint is
    the newest complete one, and the command that resumes from it.

    Installed for ``trainer.train()`` only, and only from the main thread (signal handlers live there).
    With several processes the request is agreed across ranks at every step end (one tiny all-reduce,
    read a step later so that the host need not wait for the GPU), so all of them save the same step
    and stop together. ``resume_from``: the checkpoint this run
    resumed from; the start of training logs it with the step it continues at.
    """

    def __init__(self, resume_from: str | None = None, stream: Any = None) -> None:
        self.requested = False
        self.resume_from = resume_from
        self.stream = stream
        self._previous: Any = None
        self._installed = False
        self._flag: Any = None  # the previous step's all-ranks stop request: (host tensor, CUDA event or None)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once "
              "without saving)", file=self.stream or sys.stderr, flush=True)

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from and state.is_world_process_zero:
            logger.info("Resuming from %s (step %d of %d)", self.resume_from, state.global_step, state.max_steps)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def on_step_end(self, args, state, control, **kwargs):
        from lmforge.utils.distributed import is_distributed

        stop = self.requested
        if is_distributed():
            stop = self._agreed_stop()
            self.requested = self.requested or stop
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        self._flag = None

    def _agreed_stop(self) -> bool:
        """Whether any rank had asked to stop by the end of the previous step (every rank gets the same answer).

        Each step end starts the sum of this step's requests and reads the previous step's: on GPUs the
        read waits only for the previous step's work, so the host still runs a step ahead of the GPU
        (reading this step's sum would make it wait for the whole step). A stop comes one step later.
        """
        import torch
        import torch.distributed as tdist

        from lmforge.utils.distributed import collective_device

        stop = False
        if self._flag is not None:
            host, done = self._flag
            if done is not None:
                done.synchronize()
            stop = bool(host.item() > 0)
        device = collective_device()
        flag = torch.full((1,), float(self.requested), device=device)  # a fill kernel, no host-to-device copy
        tdist.all_reduce(flag)
        if device.type == "cuda":
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._flag = (host, done)
        else:
            self._flag = (flag, None)
        return stop

    def stop_message(self, state: Any, output_dir: str, *, hard: bool) -> str:
        """Where training stopped, the newest complete checkpoint, and how to resume from it."""
        from lmforge.utils.checkpoint import find_last_checkpoint
        from lmforge.utils.command import rerun_command

        how = "at once by a second Ctrl-C" if hard else "by Ctrl-C"
        lines = [f"Training stopped {how} after step {state.global_step} of {state.max_steps}"
                 + (" (the steps since the newest checkpoint are lost)." if hard else ".")]
        last = find_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            lines.append(f"No complete checkpoint in {output_dir} yet: start the run again (that folder can go).")
        else:
            lines += [f"Newest complete checkpoint: {last}", "Resume with:",
                      "  " + rerun_command({"--resume_from_checkpoint": str(last)})]
        return "\n".join(lines)


@CALLBACKS.register("plot")
class PlotCallback(TrainerCallback):
    """Writes train_loss.png, eval_loss.png, learning_rate.png (and more) into ``output_dir``."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not args.output_dir:
            return
        from lmforge.trainers.plotting import plot_history

        try:
            paths = plot_history(state.log_history, args.output_dir)
        except Exception as e:  # a plot must never fail a finished run
            logger.warning("could not write training plots: %s: %s", type(e).__name__, e)
            return
        if paths:
            logger.info("plots written: %s", ", ".join(str(p) for p in paths))


@CALLBACKS.register("nan_guard")
class NanGuardCallback(TrainerCallback):
    """Stops training when the logged loss (or, outside fp16, the grad norm) is NaN or inf.

    A run that diverged only burns compute and overwrites good checkpoints. The check sees logged
    values, so it fires within ``logging_steps`` steps; transformers' ``logging_nan_inf_filter``
    (on by default) hides NaN losses from the log, so turn it off for this guard to see them.
    fp16 skips the loss-scaler's inf-gradient steps on purpose, so the grad norm is not checked there.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return control
        keys = ["loss"] if getattr(args, "fp16", False) else ["loss", "grad_norm"]
        bad = {k: logs[k] for k in keys if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])}
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            logger.error("nan_guard: %s at step %d: stopping training. Try a lower learning rate, "
                         "bf16 instead of fp16, or a smaller max_grad_norm; the last checkpoint before "
                         "this step is the one to resume from.", what, state.global_step)
            control.should_training_stop = True
        return control


@CALLBACKS.register("jsonl_logger")
class JsonlLoggerCallback(TrainerCallback):
    """Appends each log dict, with its step, as one JSON line to ``<output_dir>/logging.jsonl``.

    One ``write`` per line on a file opened in append mode, so a reader (the web UI, ``tail -f``,
    ``plotting``) never sees half a line from a live run. NaN and inf are written as JSON strings
    ("NaN", "Infinity") so strict JSON readers accept every line.
    """

    filename = "logging.jsonl"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not args.output_dir:
            return
        entry = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n"
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # torch / numpy scalars
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
