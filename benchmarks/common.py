"""Shared pieces for the benchmarks: a Qwen2.5-0.5B-architecture model with random weights, saved
once as a normal checkpoint folder (with lmforge's built-in tokenizer), so no download is needed."""
from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False)


def make_model_dir(spec: dict, out: str | Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a random-weight Qwen2 checkpoint of the given shape (once) and return its folder."""
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
    model.save_pretrained(out)
    tok.save_pretrained(out)
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


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t
