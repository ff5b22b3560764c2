"""Shared pieces for the benchmarks: Qwen2.5- and Qwen2-VL-architecture models with random weights, saved
once as normal checkpoint folders (with lmforge's built-in tokenizer), so no download is needed."""
from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)

# A model that costs almost nothing on CPU (one layer of width 64): the host work around it sets the pace
MICRO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=True)

# Qwen2-VL-2B-Instruct's architecture (text_config / vision_config of Qwen2VLConfig in transformers 5)
QWEN2_VL_2B = dict(
    text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    vocab_size=151936, rope_theta=1e6, mrope_section=[16, 24, 24], min_pixels=56 * 56, max_pixels=28 * 28 * 16384)


def repo_env(extra: dict | None = None) -> dict:
    """This environment for an ``lmforge`` subprocess: the repo first on ``PYTHONPATH``, whatever was there kept
    (on the GPU machine the carried packages come through it), then ``extra``."""
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **(extra or {})}


def make_model_dir(spec: dict, out: str | Path, dtype: str = "bfloat16", seed: int = 0, decodable: bool = False) -> Path:
    """Write a random-weight Qwen2 checkpoint of the given shape (once) and return its folder.

    ``decodable``: the output rows of the ids the built-in tokenizer has are scaled up and the rest zeroed, so
    the model samples ids that decode to text. The shapes (and so the compute) are the spec's; without this a
    151,936-row head samples ids past the tokenizer's 943 almost every time, which decode to nothing, and a
    streamed reply then carries text on a few tokens only (a server benchmark would see few chunks, and its
    time to first token would be the time to the first decodable id)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(TOKENIZER_DIR)
    cfg = Qwen2Config(**spec, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    if decodable:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head[len(tok):] = 0
            head[:len(tok)] *= 20
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_vl_model_dir(spec: dict, out: str | Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a random-weight Qwen2-VL checkpoint of the given shape (once) with the tokenizer and image processor
    that ``builtin:tiny-vl`` ships (the built-in tokenizer plus the vision tokens), and return its folder."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from lmforge.model.builtin import qwen2_vl_config, qwen2_vl_image_processor, vl_tokenizer

    out = Path(out)
    if (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file():
        return out
    tok = vl_tokenizer()
    cfg = qwen2_vl_config(tok, spec["text"], spec["vision"], rope_theta=spec["rope_theta"],
                          vocab_size=spec.get("vocab_size"), mrope_section=spec.get("mrope_section"), torch_dtype=dtype)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    qwen2_vl_image_processor(spec["min_pixels"], spec["max_pixels"]).save_pretrained(out)  # written last
    return out


_WORDS = ("the model learns to add numbers and answer questions about the weather in many cities while "
          "training runs on a single GPU with packing of rows into long sequences").split()


def mixed_length_jsonl(path: str | Path, n: int, lo: int = 64, hi: int = 2048, seed: int = 0) -> Path:
    """Chat rows whose lengths spread log-uniformly from ``lo`` to ``hi`` words (about tokens)."""
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as fh:
        for _ in range(n):
            total = int(lo * (hi / lo) ** rng.random())
            q = max(8, total // 3)
            a = max(8, total - q - 16)
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choices(_WORDS, k=q))},
                {"role": "assistant", "content": " ".join(rng.choices(_WORDS, k=a))}]}) + "\n")
    return path


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def step_timer(warmup: int, profile: dict | None = None):
    """A Trainer callback that times the steps after ``warmup`` (synchronising the GPU at both ends) and prints
    progress; with ``profile`` (``dir``, ``name``), records step ``warmup + 1`` under torch.profiler instead."""
    import torch
    from transformers import TrainerCallback

    start_at = warmup + (1 if profile else 0)   # the profiled step is not timed

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.start = time.perf_counter()
            self.prof = None
            self.static_gib = None

        def on_train_begin(self, args, state, control, **kw):
            if start_at == 0:
                self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if profile and state.global_step == warmup:
                from step_profile import start_profiler

                self.prof = start_profiler()

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if self.prof is not None:
                from step_profile import stop_profiler

                stop_profiler(self.prof, profile["dir"], profile["name"])
                self.prof = None
            if step == start_at or step == state.max_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if step == start_at:
                    self.t0 = now
                if step == state.max_steps:
                    self.t1 = now
                    if torch.cuda.is_available():   # weights + optimizer state, gradients freed
                        self.static_gib = torch.cuda.memory_allocated() / 2**30
            if step % 5 == 0 or step == state.max_steps:
                print(f"    step {step}/{state.max_steps}  {time.perf_counter() - self.start:.1f}s", flush=True)

    return StepTimer()


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t


def token_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                   seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs, lengths uniform in the given inclusive ranges.

    Ids are drawn from ``[0, vocab)`` (pass the tokenizer's regular vocabulary, so no special token
    lands in a prompt); the same seed gives the same workload on any machine, which is what lets the
    engine-only and the served run of bench_serve_load (and two commits) answer the same requests.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = rng.randint(*output_range)
        out.append(([rng.randrange(vocab) for _ in range(p)], o))
    return out


def regular_vocab(engine) -> int:
    """Ids a random prompt may use: the tokenizer's regular vocabulary, within the model's embedding."""
    return min(engine.tokenizer.vocab_size, engine.model.get_input_embeddings().num_embeddings)


def offline_generate(engine, workload: list[tuple[list[int], int]], cfg, seed: int | None = None) -> list:
    """Answer every (prompt ids, output length) of ``workload`` at once, each with its own length.

    ``engine.infer`` takes one RequestConfig for all requests; the per-request max_tokens lives in the
    engine's jobs, so they are built here with the engine's own validation (``_prepare``) and handed
    to ``_generate`` together: for the native engine all sequences are submitted before the first
    step, as the server's clients would submit them. ``seed``: request ``i`` samples with its own
    generator seeded ``seed + i``. Returns the engine's rows (token ids per choice).
    """
    from lmforge.serve.schemas import PromptRequest

    jobs = [engine._prepare(i, PromptRequest(prompt=ids, seed=None if seed is None else seed + i),
                            cfg.model_copy(update={"max_tokens": m}))
            for i, (ids, m) in enumerate(workload)]
    if type(engine).__name__ == "NativeEngine":
        return engine._generate(jobs, cfg)
    # The hf engine pads a batch to its longest request: batch similar lengths, as its infer does.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].max_tokens, len(jobs[i].input_ids)))
    rows: dict[int, list] = {}
    for s in range(0, len(order), engine.max_batch_size):
        part = [jobs[i] for i in order[s:s + engine.max_batch_size]]
        for job, r in zip(part, engine._generate(part, cfg)):
            rows[job.index] = r
    return [rows[i] for i in range(len(jobs))]


def model_vocab(model: str) -> int:
    """:func:`regular_vocab` without loading the weights: from the folder's config and tokenizer."""
    from transformers import AutoConfig

    from lmforge.model import load_tokenizer
    from lmforge.model.hub import resolve_model_dir

    path = resolve_model_dir(model, need_weights=False)
    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return min(load_tokenizer(path).vocab_size, cfg.vocab_size)


def run_child(script: str, cfg: dict, failed: dict, summary: Any = None) -> tuple[dict, int]:
    """Run ``script --_child CFG`` in its own process (clean CUDA peak counters, no patch leaking between
    configurations); its result JSON (``cfg["result"]``) or ``failed`` plus the exit status, with ``wall`` seconds.
    ``summary(result)`` describes a result in the line printed after it (an error line when it failed)."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: on a multi-GPU host the Trainer baselines would run nn.DataParallel
    t = time.time()
    proc = subprocess.run([sys.executable, script, "--_child", json.dumps(cfg)], env=env)
    result = Path(cfg["result"])
    res = json.loads(result.read_text()) if result.is_file() else dict(failed, error=f"child exited with {proc.returncode}")
    res["wall"] = time.time() - t
    if summary is not None:
        line = (("OOM" if res.get("oom") else "FAILED") + f": {res['error']}") if res.get("error") else summary(res)
        print(f"   -> {line}  ({res['wall']:.0f}s)", flush=True)
    return res, proc.returncode
