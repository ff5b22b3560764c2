"""Tiny random models of the families GGUF export supports, for the export tests (not a test file).

Each is a real architecture with random weights and a real byte-level BPE tokenizer: the built-in
tokenizer, with the pre-tokenizer of the family put in its place (Llama 3's or Qwen2's split), so
that the GGUF writer has to name the right one for llama.cpp.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tokenizer(out: Path, split: str | None) -> None:
    """The built-in tokenizer files in ``out``; ``split`` replaces its pre-tokenizer with a regex split."""
    from lmforge.model.builtin import TOKENIZER_DIR

    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    if split is not None:
        spec = json.loads((out / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def make_model(kind: str, out: Path, seed: int = 0, rope: dict | None = None) -> Path:
    """``kind`` in llama, qwen3, mistral: a saved random model of that family (hidden 256, 2 layers).

    The width is 256 so that the K-quants (256-wide blocks) apply; Qwen3 pads its vocabulary past
    the tokenizer's ids as the real Qwen models do. ``rope`` replaces Llama's rope parameters.
    """
    import torch
    import transformers

    write_tokenizer(out, {"llama": LLAMA3_SPLIT, "mistral": LLAMA3_SPLIT, "qwen3": QWEN2_SPLIT}[kind])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=len(tok), **common, rope_parameters=rope or {
            "rope_type": "default", "rope_theta": 500000.0})
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(vocab_size=len(tok), sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    else:
        config = transformers.Qwen3Config(vocab_size=len(tok) + 17, head_dim=128,
                                          **{**common, "tie_word_embeddings": True})
        cls = transformers.Qwen3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        with torch.no_grad():  # random norms, so a mix-up of norm tensors shows in the logits
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.9, 1.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def fp8_dequantised(folder: Path, device: str = "cpu"):
    """An FP8 export (transformers' fine-grained FP8: float8_e4m3fn weights, one float32 ``weight_scale_inv`` per
    ``weight_block_size`` block) read back by hand: each weight times its block's scale, in bfloat16, loaded into
    the plain architecture. This checks the exported numbers where transformers cannot run its FP8 matmuls (their
    kernel comes from the Hugging Face Hub, unreachable offline); activations stay unquantised, so it measures the
    weights' error only, not the dynamic activation quantisation of a real FP8 runtime."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["quant_method"] == "fp8", qc
    bo, bi = qc["weight_block_size"]
    del config.quantization_config
    tensors: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    state, fp8 = {}, 0
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"].float()
            rows, cols = t.shape
            assert scale.shape == (-(-rows // bo), -(-cols // bi)), (name, scale.shape)
            full = scale.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
            state[name] = (t.float() * full).to(torch.bfloat16)
            fp8 += 1
        else:
            state[name] = t
    assert fp8, "no float8 weights in the export"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    return model.to(device).eval()
