"""``--external_plugins benchmarks/profile_plugin.py --callbacks step_profile``: profile one training step.

For runs the benchmarks launch through the CLI (several processes under torchrun, where the
in-process recipes of ``train_recipes.py`` cannot reach): every rank profiles optimizer step
``$LMFORGE_PROFILE_STEP`` (default 8) with ``step_profile`` and writes
``$LMFORGE_PROFILE_DIR/$LMFORGE_PROFILE_NAME-rank<r>.*`` (trace, summary). Both ranks' summaries side by
side show a straggler (one rank's GPU busy while the other's waits in the gradient all-reduce).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from lmforge.registry import CALLBACKS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import start_profiler, stop_profiler  # noqa: E402


@CALLBACKS.register("step_profile")
class StepProfileCallback(TrainerCallback):
    def __init__(self) -> None:
        self.step = int(os.environ.get("LMFORGE_PROFILE_STEP", "8"))
        self.out = os.environ.get("LMFORGE_PROFILE_DIR", "profile")
        self.name = os.environ.get("LMFORGE_PROFILE_NAME", "lmforge")
        self.prof = None
        self.rank = int(os.environ.get("RANK", "0"))
        self.times: list[float] = []
        self.last = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:   # the step about to run is number self.step
            self.prof = start_profiler()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None and self.prof is None:
            self.times.append((now - self.last) * 1e3)
        if self.prof is not None:
            stop_profiler(self.prof, self.out, f"{self.name}-rank{self.rank}")
            self.prof = None
            now = time.perf_counter()
        self.last = now

    def on_train_end(self, args, state, control, **kwargs):
        if not self.times:
            return
        Path(self.out).mkdir(parents=True, exist_ok=True)
        Path(self.out, f"{self.name}-rank{self.rank}.steps.json").write_text(json.dumps(self.times))
        med = statistics.median(self.times)
        slow = [f"{i + 2}:{t:.0f}" for i, t in enumerate(self.times) if t > 1.5 * med]
        print(f"step host ms {self.name} rank {self.rank}: median {med:.1f}, max {max(self.times):.1f}; "
              f"steps over 1.5x median (step:ms): {' '.join(slow) or 'none'}", flush=True)
