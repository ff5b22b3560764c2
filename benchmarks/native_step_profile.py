"""Per-step timing of the native engine, from outside: where a step's wall time goes, host vs device.

:class:`StepRecorder` wraps the engine's step and its phases as *instance* attributes (plus the
engine module's ``sample`` name) and puts them back on :meth:`StepRecorder.detach`; the engine's
code is not changed. Every step records its wall time, the time since the previous step ended
(the loop between steps: inbox drain, lock), and its batch: decoding rows and prompt tokens.

With ``phases=True`` (bench_generate ``--step_profile``) the phases are timed with
``time.perf_counter``: scheduling, ``runner.execute`` (building inputs and launching the forward or
replaying its CUDA graph), ``scheduler.advance`` (registering full KV blocks), ``sample`` (host
side: launching the sampler's kernels), the wait for the device, stop-string checks (they
detokenise), ``scheduler.finish``, the per-token callbacks (``on_token``) and the rest of the step
(``.tolist()``, appending tokens, stop-id and length checks, counters: the per-row loop of
``NativeEngine._step``). On CUDA, events around ``execute`` and ``sample`` give the device time of
the forward and of the sampler. The only behavioural difference: ``torch.cuda.synchronize()``
before and after sampling (the step's ``.tolist()`` waits after it anyway, and with temperature > 0
the sampler's small host-to-device copies wait for the forward before it), so that "waiting for the
device" is one number and every other phase is host time; the sampler's launches no longer overlap
the end of the forward, a small cost the host-time figures already carry. Those synchronisations also undo
the engine's asynchronous scheduling (a step's host work overlapping the previous step's device work), so
phase figures describe the engine as it runs with ``async_scheduling=False``; without ``phases`` only step
wall times and batches are recorded, and nothing is synchronised.
"""
from __future__ import annotations

import time
from typing import Any

PHASES = ("schedule", "execute", "advance", "sample", "device_wait", "stop_strings", "finish", "callbacks")
PHASE_NAMES = {"schedule": "scheduling (scheduler.schedule)",
               "execute": "inputs + forward launch / graph replay (runner.execute)",
               "advance": "KV block registration (scheduler.advance)",
               "sample": "sampler launch (sampler.sample, host side)",
               "device_wait": "waiting for the device (forward, then sampler)",
               "stop_strings": "stop-string checks (detokenise)",
               "finish": "finishing sequences (scheduler.finish)",
               "callbacks": "per-token callbacks (on_token)",
               "rest": "per-row loop: tolist, append, stop ids, counters"}


class StepRecorder:
    """Attach to a running :class:`~lmforge.infer.native.NativeEngine`; read :attr:`steps` afterwards."""

    def __init__(self, engine: Any, *, phases: bool = False):
        import torch

        self.engine = engine
        self.phases = phases
        self.cuda = phases and engine.device.type == "cuda" and torch.cuda.is_available()
        self.steps: list[dict[str, Any]] = []
        self._cur: dict[str, Any] | None = None
        self._last_end: float | None = None
        self._in_schedule = False
        self._saved: list[tuple[Any, str, Any, bool]] = []

    # ---- wrapping ------------------------------------------------------------------------------
    def _wrap(self, owner: Any, name: str, make: Any) -> None:
        had = name in vars(owner)
        original = getattr(owner, name)
        self._saved.append((owner, name, vars(owner).get(name), had))
        setattr(owner, name, make(original))

    def _timed(self, phase: str, when: Any = None):
        def make(original):
            def wrapper(*a, **kw):
                cur = self._cur
                if cur is None or (when is not None and not when()):
                    return original(*a, **kw)
                t = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    cur[phase] += time.perf_counter() - t
            return wrapper
        return make

    def attach(self) -> StepRecorder:
        """Wrap the engine's phases; call while the engine is idle (between runs)."""
        import lmforge.infer.native.engine as engine_module

        eng = self.engine
        self._wrap(eng, "_step", self._make_step)
        self._wrap(eng.scheduler, "schedule", self._make_schedule)
        if self.phases:
            self._wrap(eng.runner, "execute", self._make_execute)
            self._wrap(engine_module, "sample", self._make_sample)
            self._wrap(eng.scheduler, "advance", self._timed("advance"))
            self._wrap(eng.scheduler, "finish", self._timed("finish", when=lambda: not self._in_schedule))
            self._wrap(eng, "_stop_string_in_tail", self._timed("stop_strings"))
            self._wrap(eng, "_notify", self._timed("callbacks"))
        return self

    def detach(self) -> None:
        """Unwrap, once the step in flight (the one that woke the caller) has been recorded."""
        lock = getattr(self.engine, "_step_lock", None)  # held by the engine loop for a whole step
        if lock is not None:
            with lock:
                pass
        for owner, name, value, had in reversed(self._saved):
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        self._saved.clear()

    def __enter__(self) -> StepRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _make_step(self, original):
        def step():
            cur = {p: 0.0 for p in PHASES}
            cur.update(rows=0, decode_rows=0, prefill_tokens=0, events=[])
            self._cur = cur
            t0 = time.perf_counter()
            try:
                return original()
            finally:
                end = time.perf_counter()
                cur["wall"] = end - t0
                cur["gap"] = t0 - self._last_end if self._last_end is not None else 0.0
                self._last_end = end
                self._cur = None
                if cur["rows"]:
                    self.steps.append(cur)
        return step

    def _make_schedule(self, original):
        def schedule():
            cur = self._cur
            t = time.perf_counter()
            self._in_schedule = True
            try:
                batch = original()
            finally:
                self._in_schedule = False
            if cur is not None:
                cur["schedule"] += time.perf_counter() - t
                cur["rows"] = len(batch)
                # A decode row adds one token to a sequence that has output; a 1-token prompt tail is prefill.
                dec = sum(1 for s, n in batch if n == 1 and s.num_output > 0)
                cur["decode_rows"] = dec
                cur["prefill_tokens"] = sum(n for s, n in batch) - dec
            return batch
        return schedule

    def _events(self, kind: str, fn, *a, **kw):
        import torch

        cur = self._cur
        if not self.cuda or cur is None:
            return fn(*a, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*a, **kw)
        end.record()
        cur["events"].append((kind, start, end))
        return out

    def _make_execute(self, original):
        def execute(batch, sample_rows, *rest):
            cur = self._cur
            t = time.perf_counter()
            out = self._events("forward", original, batch, sample_rows, *rest)
            if cur is not None:
                cur["execute"] += time.perf_counter() - t
            return out
        return execute

    def _make_sample(self, original):
        import torch

        def sample(logits, seqs, *args, **kwargs):
            cur = self._cur
            t = time.perf_counter()
            if self.cuda:  # the forward first: the sampler's small host-to-device copies would wait for it
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = self._events("sampler", original, logits, seqs, *args, **kwargs)
            t1 = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
            if cur is not None:
                cur["sample"] += t1 - t0
                cur["device_wait"] += (t0 - t) + (time.perf_counter() - t1)
            return out
        return sample

    # ---- results -------------------------------------------------------------------------------
    def resolve_events(self) -> None:
        """Device milliseconds of each step's forward and sampler (after the run; syncs once)."""
        if not self.cuda:
            return
        import torch

        torch.cuda.synchronize()
        for s in self.steps:
            for kind in ("forward", "sampler"):
                s[kind + "_device"] = sum(a.elapsed_time(b) / 1000 for k, a, b in s["events"] if k == kind)
            s["events"] = []

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        """Steps split by what they carried: full-batch decode (the most decode rows seen, no prompt
        tokens), all decode-only steps, and steps with prompt tokens (prefill, chunked or mixed)."""
        full = max((s["decode_rows"] for s in self.steps if not s["prefill_tokens"]), default=0)
        return {"full_batch_decode": [s for s in self.steps if not s["prefill_tokens"] and s["decode_rows"] == full],
                "decode_only": [s for s in self.steps if not s["prefill_tokens"]],
                "with_prefill": [s for s in self.steps if s["prefill_tokens"]]}

    def summary(self) -> dict[str, Any]:
        self.resolve_events()
        out: dict[str, Any] = {"steps": len(self.steps),
                               "step_seconds": round(sum(s["wall"] for s in self.steps), 4),
                               "between_steps_seconds": round(sum(s["gap"] for s in self.steps), 4)}
        for name, group in self.groups().items():
            n = len(group)
            g: dict[str, Any] = {"steps": n}
            if n:
                g["rows"] = max(s["rows"] for s in group)
                g["seconds"] = round(sum(s["wall"] for s in group), 4)
                g["mean_step_ms"] = round(1000 * g["seconds"] / n, 3)
                g["mean_gap_ms"] = round(1000 * sum(s["gap"] for s in group) / n, 3)
                if self.phases:
                    g["phases_ms"] = phase_means(group)
            out[name] = g
        return out


def phase_means(group: list[dict[str, Any]]) -> dict[str, float]:
    """Mean milliseconds per step of each host phase, the rest of the step, host total and device times."""
    n = len(group)
    mean = {p: 1000 * sum(s[p] for s in group) / n for p in PHASES}
    wall = 1000 * sum(s["wall"] for s in group) / n
    mean["rest"] = wall - sum(mean.values())
    mean["wall"] = wall
    mean["host"] = wall - mean["device_wait"]
    if "forward_device" in group[0]:
        mean["forward_device"] = 1000 * sum(s["forward_device"] for s in group) / n
        mean["sampler_device"] = 1000 * sum(s["sampler_device"] for s in group) / n
        mean["device_idle"] = wall - mean["forward_device"] - mean["sampler_device"]
    return {k: round(v, 3) for k, v in mean.items()}


def print_profile(summary: dict[str, Any], group: str = "full_batch_decode") -> None:
    """The per-step table of one group of steps (default: decode steps at the full batch)."""
    g = summary.get(group) or {}
    ph = g.get("phases_ms")
    if not ph:
        print(f"step profile: no {group} steps")
        return
    print(f"\nstep profile, {group}: {g['steps']} steps of {g['rows']} rows, mean {ph['wall']:.3f} ms/step "
          f"(+ {g['mean_gap_ms']:.3f} ms between steps in the engine loop)")
    for p in (*PHASES, "rest"):
        print(f"  {PHASE_NAMES[p]:58}{ph[p]:>9.3f} ms {100 * ph[p] / ph['wall']:>5.1f}%")
    line = f"  host time {ph['host']:.3f} ms/step"
    if "forward_device" in ph:
        line += (f"; device: forward {ph['forward_device']:.3f} ms, sampler {ph['sampler_device']:.3f} ms, "
                 f"idle {ph['device_idle']:.3f} ms/step ({100 * ph['device_idle'] / ph['wall']:.0f}%)")
    else:
        line += "; device times need CUDA (not measured)"
    print(line)
