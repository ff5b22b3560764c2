"""A transformers model folder -> one GGUF file that llama.cpp, Ollama and LM Studio load.

The ``gguf`` package (gguf-py, maintained with llama.cpp) writes the file, names the tensors
(``get_tensor_name_map``), quantises (``quants``, plus ``gguf_quants`` for the K-quants it only
reads) and carries the merges, special-token ids, add-BOS flags and chat template
(``SpecialVocab``). What is left here is what llama.cpp's own ``convert_hf_to_gguf.py`` does per
family and gguf-py does not: the hyper-parameter keys, the rotary permutation of Llama's q/k rows,
Llama 3.1's rope scaling as a ``rope_freqs`` tensor, the vocabulary with its token types, and naming
the pre-tokenizer. llama.cpp picks its pre-tokenizer by that name, so an unknown one (or a
SentencePiece vocabulary, or another rope scaling) is an error here rather than a file that
tokenizes or positions differently from the model it came from.

Weights are read one tensor at a time from the safetensors shards, so memory stays near the size
of the output file; the file is written beside its final name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.export.gguf_quants import QUANT_TYPES, file_type, quantize_tensor, tensor_type

logger = logging.getLogger(__name__)

# transformers architecture -> (llama.cpp architecture, whether q/k rows are permuted for its rope)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}

# Byte-level BPE pre-tokenizers llama.cpp knows, by its name for them (tokenizer.ggml.pre).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Text that tells the pre-tokenizers above apart (contractions, digit runs, newlines, case, symbols).
_PROBE = ("Hello World! It's 12345 apples,  they'll cost $3.50\n\n\tCamelCaseWord ÄÖü 3x+y=7\r\n"
          "   spaces   end 🚀 中文 don't I'M  ")


def _pre_tokenizer_candidates() -> dict[str, Any]:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split(pattern: str):
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "llama-bpe": split(_LLAMA3),
        "qwen2": split(_QWEN2),
        "tekken": split(_TEKKEN),
        # digits one by one, then GPT-2's split (SmolLM; the built-in tiny model's tokenizer)
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "gpt-2": pt.ByteLevel(add_prefix_space=False),
    }


def detect_pre_tokenizer(tokenizer_file: Path) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, found by splitting the same text both ways."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tokenizer_file}: a {model.get('type')} vocabulary"
                         f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; "
                         f"lmforge writes GGUF for byte-level BPE tokenizers (Llama 3, Qwen2/3, Mistral "
                         f"Nemo/Small). Convert this model with llama.cpp's convert_hf_to_gguf.py")
    if tok.pre_tokenizer is None:
        raise ValueError(f"{tokenizer_file}: no pre-tokenizer; cannot name one for llama.cpp")
    want = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(_PROBE)]
    for name, candidate in _pre_tokenizer_candidates().items():
        if [piece for piece, _ in candidate.pre_tokenize_str(_PROBE)] == want:
            return name
    raise ValueError(f"{tokenizer_file}: its pre-tokenizer matches none llama.cpp knows that lmforge can name "
                     f"({', '.join(_pre_tokenizer_candidates())}); the GGUF would tokenize differently. "
                     f"Convert this model with llama.cpp's convert_hf_to_gguf.py")


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the model's vocab_size) and their GGUF token types."""
    from gguf import TokenType
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:  # rows of the embedding no token uses (Qwen pads its vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _rope(config: Any, gguf_arch: str) -> tuple[float, dict]:
    """Rope theta and parameters; Llama 3.1's ``llama3`` scaling is written as llama.cpp's rope_freqs tensor."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # configs written before transformers 5
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "llama3") or (kind == "llama3" and gguf_arch != "llama"):
        raise ValueError(f"rope_type {kind!r}: lmforge writes GGUF for unscaled rotary embeddings and Llama 3's "
                         f"llama3 scaling; convert this model with llama.cpp's convert_hf_to_gguf.py")
    return float(params["rope_theta"]), {**params, "rope_type": kind}


def _llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (the published formula), as llama.cpp's rope_freqs."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    freqs = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, mid))
    return out.astype(np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Llama's q/k rows from HF's half-split rotary layout to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_names(model_dir: Path) -> dict[str, Path]:
    """Every tensor in the folder's safetensors files -> the file holding it."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to convert")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _read(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def check_gguf_support(model_dir: str | Path) -> tuple[Any, str, str]:
    """``(config, architecture, pre-tokenizer name)``, or a clear error for what GGUF export cannot do.

    Cheap (config and tokenizer files only), so the export runs it before merging or loading weights.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    archs = list(getattr(config, "architectures", None) or [])
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{model_dir}: architecture {', '.join(archs) or config.model_type} has no GGUF writer in "
                         f"lmforge (supported: {', '.join(ARCHITECTURES)})")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json (a fast tokenizer is needed for the GGUF vocabulary)")
    pre = detect_pre_tokenizer(model_dir / "tokenizer.json")
    _rope(config, ARCHITECTURES[arch][0])
    return config, arch, pre


def convert_to_gguf(model_dir: str | Path, out_file: str | Path, quant_type: str = "f16",
                    name: str | None = None) -> Path:
    """Write ``model_dir`` (a transformers folder with tokenizer.json) to ``out_file`` as GGUF."""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"--quant_type {quant_type!r}: GGUF export supports {', '.join(QUANT_TYPES)}")
    config, arch, pre = check_gguf_support(model_dir)
    gguf_arch, permute_qk = ARCHITECTURES[arch]
    rope_theta, rope = _rope(config, gguf_arch)

    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tokens, types = _vocab(model_dir, config.vocab_size)
    if len(tokens) != config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {len(tokens)} ids but the model's vocab_size is "
                         f"{config.vocab_size}")

    name = name or model_dir.resolve().name
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf_arch, use_temp_file=True)  # tensors spool to disk, not RAM
    writer.add_name(name)
    writer.add_file_type(file_type(quant_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ValueError(f"{model_dir}/tokenizer.json: no BPE merges found")
    if special.chat_template is None:
        logger.warning("%s has no chat template; the GGUF will carry none", model_dir)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = {n: p for n, p in _tensor_names(model_dir).items()
             if not n.endswith("rotary_emb.inv_freq") and not (tied and n == "lm_head.weight")}
    has_output = "lm_head.weight" in files
    counts: dict[str, int] = {}
    for hf_name, path in files.items():
        data = _read(path, hf_name)
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{model_dir}: tensor {hf_name} has no llama.cpp name for {gguf_arch}")
        if permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        qtype = tensor_type(new_name, data.shape, quant_type, n_layers, has_output)
        writer.add_tensor(new_name, quantize_tensor(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    if rope["rope_type"] == "llama3":
        factors = _llama3_rope_factors(rope, head_dim)
        writer.add_tensor("rope_freqs.weight", factors, raw_dtype=gguf.GGMLQuantizationType.F32)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("GGUF %s written (%s, pre-tokenizer %s, tensors %s)", out_file, quant_type, pre,
                ", ".join(f"{k}x{v}" for k, v in sorted(counts.items())))
    return out_file
