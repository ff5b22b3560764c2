"""``lmforge export --quant_method gguf``: files that independent readers load back as the same model.

The reader is transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``: its own tokenizer
rebuild, its own reverse of Llama's q/k permutation, gguf-py's dequantisers), and llama.cpp itself
through llama-cpp-python where that is installed. Measured on these models (max |logit diff| against
the float32 source, logits of magnitude ~1.3-1.7): f16 4e-4..1e-3 (1e-3 asserted, vs source
weights rounded to f16 ~1e-6), q8_0 1.2e-2..2.7e-2 (5e-2 asserted), q4_k_m 0.2..0.3 on random weights
(checked instead against the error of gguf-py's own Q4_0 on the same model).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export_models import make_model

pytest.importorskip("gguf")
MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's 37 + 45?  Answer\n\nin digits: 1234 ÄÖü 🚀"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from lmforge.model.builtin import builtin_model_dir

    root = tmp_path_factory.mktemp("src")
    return {"tiny": builtin_model_dir("builtin:tiny"), "llama": make_model("llama", root / "llama", seed=1),
            "qwen3": make_model("qwen3", root / "qwen3", seed=2),
            "mistral": make_model("mistral", root / "mistral-tiny", seed=4)}


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """``(kind, quant_type) -> .gguf path``, each alone in its folder as a user would download it."""
    from lmforge.export.to_gguf import convert_to_gguf

    out = {}
    for kind, quant in [("tiny", "f16"), ("tiny", "q8_0"), ("tiny", "bf16"), ("llama", "f16"),
                        ("llama", "q4_k_m"), ("qwen3", "f16"), ("qwen3", "q8_0"), ("mistral", "f16")]:
        folder = tmp_path_factory.mktemp(f"{kind}-{quant}")
        out[kind, quant] = convert_to_gguf(models[kind], folder / f"{kind}-{quant}.gguf", quant)
    return out


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _source(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _prompt_ids(tok):
    return tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("kind", ["tiny", "llama", "qwen3", "mistral"])
def test_f16_reads_back_as_the_same_model_tokenizer_and_template(kind, models, ggufs):
    ref, ref_tok = _source(models[kind])
    got, got_tok = _load(ggufs[kind, "f16"])
    assert got_tok.chat_template == ref_tok.chat_template
    prompt = got_tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert got_tok(prompt)["input_ids"] == ref_tok(prompt)["input_ids"]  # the pre-tokenizer was named right
    assert got_tok.eos_token == ref_tok.eos_token and got_tok.pad_token == ref_tok.pad_token

    ids = _prompt_ids(ref_tok)
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
        assert (a - b).abs().max() < 1e-3
        rounded = {k: v.half().float() if v.dim() > 1 else v for k, v in ref.state_dict().items()}  # 1-D stay F32
        ref.load_state_dict(rounded)  # the same weights as the file: what is left is layout, not precision
        assert (ref(ids).logits - b).abs().max() < 1e-4
        gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=ref_tok.pad_token_id)
        assert torch.equal(ref.generate(ids, **gen), got.generate(ids, **gen))


@pytest.mark.parametrize("kind, quant, tol", [("tiny", "q8_0", 5e-2), ("qwen3", "q8_0", 5e-2), ("tiny", "bf16", 1e-2)])
def test_q8_0_and_bf16_within_their_tolerance(kind, quant, tol, models, ggufs):
    """Measured max |logit diff|: q8_0 1.2e-2 (tiny), 2.2e-2 (qwen3); bf16 keeps 8 bits of mantissa."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(ggufs[kind, quant]).tensors}
    assert types["blk.0.attn_q.weight"] == {"q8_0": T.Q8_0, "bf16": T.BF16}[quant]
    assert types["output_norm.weight"] == T.F32
    ref, ref_tok = _source(models[kind])
    got, _ = _load(ggufs[kind, quant])
    ids = _prompt_ids(ref_tok)
    with torch.no_grad():
        assert (ref(ids).logits - got(ids).logits).abs().max() < tol


def test_q4_k_m_mixes_types_as_llama_cpp_and_is_no_worse_than_q4_0(models, ggufs, tmp_path, monkeypatch):
    """Q4_K/Q6_K are quantised by lmforge; gguf-py (an independent implementation) dequantises them for
    transformers. The model read back must be at least as close to the source as gguf-py's own Q4_0."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    import lmforge.export.to_gguf as to_gguf

    types = {t.name: t.tensor_type for t in GGUFReader(ggufs["llama", "q4_k_m"]).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_K and types["output.weight"] == T.Q6_K
    # of 2 layers, llama.cpp's rule gives the last (last eighth) more bits for attn_v and ffn_down
    assert types["blk.1.ffn_down.weight"] == T.Q6_K and types["blk.1.attn_v.weight"] == T.Q6_K
    assert types["blk.0.ffn_down.weight"] == T.Q4_K and types["blk.0.attn_v.weight"] == T.Q4_K
    assert types["blk.1.ffn_gate.weight"] == T.Q4_K and types["blk.1.attn_norm.weight"] == T.F32

    monkeypatch.setattr(to_gguf, "tensor_type", lambda name, shape, *a: T.F32 if len(shape) < 2 else T.Q4_0)
    q4_0 = to_gguf.convert_to_gguf(models["llama"], tmp_path / "q4_0.gguf", "q4_k_m")
    ref, ref_tok = _source(models["llama"])
    ids = _prompt_ids(ref_tok)
    with torch.no_grad():
        want = ref(ids).logits
        err_k = (_load(ggufs["llama", "q4_k_m"])[0](ids).logits - want).abs().mean()
        err_0 = (_load(q4_0)[0](ids).logits - want).abs().mean()
    assert err_k < err_0


def test_k_quant_blocks_decode_with_gguf_py():
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from lmforge.export.gguf_quants import quantize_q4_k, quantize_q6_k

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 512)) * 0.02).astype(np.float32)
    x[1] += 0.05  # an all-positive row: the min offset is clamped at zero
    x[2, :256] = 0.0  # an all-zero block
    for mine, qtype, reference in ((quantize_q4_k, T.Q4_K, T.Q4_0), (quantize_q6_k, T.Q6_K, T.Q5_0)):
        blocks = mine(x)
        assert blocks.dtype == np.uint8 and blocks.shape == (16, 512 // 256 * {T.Q4_K: 144, T.Q6_K: 210}[qtype])
        back = quants.dequantize(blocks, qtype)
        assert back.shape == x.shape and np.all(back[2, :256] == 0)
        ref_err = np.abs(quants.dequantize(quants.quantize(x, reference), reference) - x).mean()
        assert np.abs(back - x).mean() < ref_err  # a wrong bit layout would be far worse than either
    step = (x.reshape(-1, 32).max(1) - np.minimum(x.reshape(-1, 32).min(1), 0)) / 15
    err = np.abs(quants.dequantize(quantize_q4_k(x), T.Q4_K) - x).reshape(-1, 32).max(1)
    assert np.all(err <= step * 0.75 + 1e-4)  # about half a step, plus the 6-bit rounding of the scales


def test_adapter_checkpoint_is_merged_first(tmp_path):
    from test_infer_hf import make_lora_checkpoint

    from lmforge.cli.main import main

    ckpt = make_lora_checkpoint(tmp_path / "run", seed=4)
    assert main(["export", "--ckpt_dir", str(ckpt), "--quant_method", "gguf", "--quant_type", "f16"]) == 0
    (out,) = (tmp_path / "run").glob("export-checkpoint-5-*-gguf-f16")  # the one output rule
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoint-5-f16.gguf"]
    assert not list((tmp_path / "run").glob(".lmforge-merge-*"))  # the scratch merge is gone
    card = (out / "README.md").read_text()
    assert "Base model: `builtin:tiny`" in card and "library_name: gguf" in card and "--quant_method gguf" in card
    assert "base_model:" not in card  # a built-in model is no hub id to link

    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    engine = HfEngine(ckpt_dir=str(ckpt), device="cpu")
    msgs = [{"role": "user", "content": "What is 37 + 45?"}]
    want = engine.infer([InferRequest(messages=msgs)], RequestConfig(max_tokens=10))[0].choices[0].token_ids
    got, tok = _load(out / "checkpoint-5-f16.gguf")
    ids = tok.apply_chat_template([{"role": "system", "content": "You are a careful calculator."}, *msgs],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = got.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen[0, ids.shape[1]:].tolist()[:len(want)] == want


def test_what_gguf_cannot_write_fails_before_any_work(tmp_path, models):
    import json
    import shutil

    from lmforge.arguments import ExportArguments
    from lmforge.pipelines.export import export_main

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(models["tiny"], gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(ValueError, match="Phi3ForCausalLM has no GGUF writer.*LlamaForCausalLM"):
        export_main(ExportArguments(ckpt_dir=str(gpt2), quant_method="gguf"))

    spm = tmp_path / "spm"
    shutil.copytree(models["tiny"], spm)
    tok = json.loads((spm / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (spm / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="pre-tokenizer matches none llama.cpp knows"):
        export_main(ExportArguments(ckpt_dir=str(spm), quant_method="gguf"))

    scaled = tmp_path / "scaled"
    shutil.copytree(models["llama"], scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                              "original_max_position_embeddings": 128}
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        export_main(ExportArguments(ckpt_dir=str(scaled), quant_method="gguf"))
    assert not [p for p in tmp_path.iterdir() if "gguf" in p.name]  # nothing written


def test_unknown_quant_type_names_the_choices(models, capsys):
    from lmforge.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_dir", str(models["tiny"]), "--quant_method", "gguf", "--quant_type", "q4_k"])
    assert e.value.code == 2 and "Did you mean 'q4_k_m'?" in capsys.readouterr().err


def test_llama_cpp_runs_the_file(models, ggufs):
    """llama.cpp itself (llama-cpp-python, which builds from source in ~15 min and is not a dependency):
    the same prompt tokens, logits close to the source, the same greedy continuation; and its decoding of
    lmforge's Q4_K/Q6_K blocks agrees with gguf-py's (measured 1.9e-2: llama.cpp multiplies K-quants against
    8-bit-quantised activations) while both are 0.24 from the float32 source."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def run(path, ids, n_new=0):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        llm.eval(ids)
        scores = torch.tensor(np.array(llm.scores[:len(ids)]))
        new = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if len(new) == n_new:
                break
            new.append(token)
        return llm, scores, new

    for kind in ("tiny", "llama", "qwen3"):
        ref, ref_tok = _source(models[kind])
        prompt = ref_tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
        ids = ref_tok(prompt)["input_ids"]
        llm, got, new = run(ggufs[kind, "f16"], ids, n_new=8)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, kind
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
            greedy = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=ref_tok.pad_token_id)[0, len(ids):].tolist()
        assert (got - want).abs().max() < 5e-3, kind  # measured 6.8e-4..1.3e-3
        assert new == greedy[:len(new)] and len(new) >= 1, kind  # stops early only at an end-of-turn token

    _, ref_tok = _source(models["llama"])
    ids = _prompt_ids(ref_tok)
    with torch.no_grad():
        via_gguf_py = _load(ggufs["llama", "q4_k_m"])[0](ids).logits[0]
    assert (run(ggufs["llama", "q4_k_m"], ids[0].tolist())[1] - via_gguf_py).abs().max() < 5e-2


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    """Llama 3.1's ``llama3`` rope scaling is written as llama.cpp's ``rope_freqs`` tensor; llama.cpp then
    matches transformers (measured 1.3e-3 over 149 tokens, where the scaling itself moves logits by 5e-2).
    transformers' own GGUF reader ignores rope_freqs, so only llama.cpp can check this."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from lmforge.export.to_gguf import convert_to_gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = make_model("llama", tmp_path / "llama3", seed=1, rope=rope)
    path = convert_to_gguf(src, tmp_path / "llama3.gguf", "f16")
    factors = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
    assert factors[0] == 1.0 and factors[-1] == 8.0 and len(factors) == 32  # high freqs kept, low ones / 8
    ref, tok = _source(src)
    ids = tok("hello world, this is a long-ish prompt to see positions matter " * 4)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert (torch.tensor(np.array(llm.scores[:len(ids)])) - want).abs().max() < 5e-3
