"""The built-in tiny model: ``builtin:tiny``.

A Qwen2-architecture causal LM with random weights drawn from a fixed seed, and a byte-level BPE
tokenizer that ships inside the package (trained here by ``build_tokenizer.py``; digits split one
by one as Qwen's tokenizer does; ChatML chat template). On first use the model is written to a
cache folder with ``save_pretrained`` and from then on it is loaded like any local checkpoint, so
save, reload, merge and serve treat it exactly as a hub model.
"""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
BUILTIN_PREFIX = "builtin:"

# Sized to train on two CPU cores in minutes (about 1.2M parameters with tied embeddings).
MODEL_SPECS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        seed=0,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def is_builtin(name: str | None) -> bool:
    return bool(name) and str(name).startswith(BUILTIN_PREFIX)


def builtin_model_dir(name: str) -> Path:
    """Materialise ``builtin:<name>`` on disk (once) and return its folder."""
    key = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if key not in MODEL_SPECS:
        import difflib

        close = difflib.get_close_matches(key, list(MODEL_SPECS), n=1)
        hint = f" Did you mean 'builtin:{close[0]}'?" if close else ""
        raise ValueError(f"unknown built-in model {name!r}.{hint} Known: "
                         + ", ".join(f"builtin:{k}" for k in MODEL_SPECS))
    from lmforge import __version__

    out = cache_root() / "models" / f"{key}-v{__version__}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _write_builtin(key, out)
    return out


def _write_builtin(key: str, out: Path) -> None:
    import tempfile

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODEL_SPECS[key])
    seed = spec.pop("seed")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    rope_theta = spec.pop("rope_theta")
    config = Qwen2Config(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        torch_dtype="float32",
        **spec,
    )
    # Seeded CPU generator: the same weights on every machine.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"),
                                            tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: two processes racing here never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    from lmforge.utils.io import apply_umask

    apply_umask(tmp)  # mkdtemp made it 0700 and safetensors writes 0600: give it the user's umask
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
