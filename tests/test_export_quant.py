"""``lmforge export --quant_method bnb|fp8|int4|int8|gptq|awq``: exports that transformers reloads, and
requests that cannot run here failing before any work with what to install or use instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.arguments import ExportArguments


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    """A full-model checkpoint with a run's args.json (the system prompt travels into the export)."""
    import shutil

    from lmforge.arguments import TrainArguments, save_args
    from lmforge.model.builtin import builtin_model_dir

    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoint-3"
    shutil.copytree(builtin_model_dir("builtin:tiny"), ckpt)
    save_args(TrainArguments(model="builtin:tiny", train_type="full", system="Answer in one word."), run)
    return ckpt


def _reload_and_generate(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model, model(ids).logits, model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_int8_weight_only_reloads_and_generates(full_ckpt):
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    from lmforge.pipelines.export import export_main

    out = export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method="int8"))["output_dir"]
    assert out.startswith(str(full_ckpt.parent / "export-checkpoint-3-")) and out.endswith("-int8")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert json.loads((Path(out) / "args.json").read_text())["system"] == \
        "Answer in one word."
    ids = torch.tensor([[1, 80, 81, 229, 25, 26, 2, 207, 1]])
    model, logits, gen = _reload_and_generate(out, ids)
    assert "Int8" in type(model.model.layers[0].mlp.up_proj.weight).__name__  # really stored as int8
    ref = AutoModelForCausalLM.from_pretrained(full_ckpt, dtype=torch.float32)
    with torch.no_grad():
        want = ref(ids).logits
        assert 0 < (logits - want).abs().max() < 5e-2  # measured 1.3e-2: per-row int8 weights
        assert torch.equal(gen, ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))

    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    reply = HfEngine(ckpt_dir=out, device="cpu").infer([InferRequest(messages=[{"role": "user", "content": "hi"}])],
                                                       RequestConfig(max_tokens=4))[0]
    assert reply.choices[0].token_ids  # `lmforge infer --ckpt_dir <export>` runs it


def test_bnb_4bit_reloads_and_generates_on_cpu(full_ckpt, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lmforge.pipelines.export import export_main

    out = export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method="bnb", quant_bits=4,
                                      output_dir=str(tmp_path / "nf4")))["output_dir"]
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    model, logits, gen = _reload_and_generate(out, torch.tensor([[1, 80, 81, 229, 2, 207, 1]]))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit" and gen.shape[1] == 15


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_need_a_dataset(method, full_ckpt):
    from lmforge.pipelines.export import export_main

    # named whether or not llm-compressor is installed: the flags are checked before the package
    with pytest.raises(ValueError, match=rf"--quant_method {method} calibrates on data: pass --dataset"):
        export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method=method))


def test_gptq_and_awq_without_llmcompressor_name_the_pip_command(monkeypatch, full_ckpt):
    import importlib.util

    from lmforge.export import calibrated
    from lmforge.pipelines.export import export_main
    from lmforge.utils.errors import SetupError

    real = importlib.util.find_spec
    monkeypatch.setattr(calibrated.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llmcompressor" else real(name, *a))
    for method in ("gptq", "awq"):
        with pytest.raises(SetupError, match=rf"--quant_method {method} needs llm-compressor: "
                                             rf"pip install 'lmforge\[quant\]'"):
            export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method=method, dataset=["builtin:arith#8"]))


def test_calibration_rows_are_rendered_by_the_checkpoints_template(monkeypatch, full_ckpt, tmp_path):
    """The export hands llm-compressor whole conversations in the run's own rendering (its system prompt
    included), --quant_n_samples of them, each cut to --max_length; no llm-compressor needed to check it."""
    import importlib.util
    import shutil

    from lmforge.export import calibrated
    from lmforge.pipelines.export import export_main

    real = importlib.util.find_spec
    monkeypatch.setattr(calibrated.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "llmcompressor" else real(name, *a))
    seen = {}

    def fake_quantize(model_dir, out, method, samples, tokenizer, **kw):
        seen.update(method=method, samples=samples, tokenizer=tokenizer, **kw)
        for f in Path(model_dir).iterdir():
            shutil.copy(f, out / f.name)
        return out

    monkeypatch.setattr(calibrated, "quantize_calibrated", fake_quantize)
    out = export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method="gptq", quant_bits=8, max_length=24,
                                      dataset=["builtin:arith#40"], quant_n_samples=12))["output_dir"]
    assert out.endswith("-gptq-w8a16") and seen["method"] == "gptq" and seen["quant_bits"] == 8
    samples, tok = seen["samples"], seen["tokenizer"]
    assert len(samples) == 12 and max(map(len, samples)) == 24  # the system prompt makes every row longer than 24
    assert tok.decode(samples[0]).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nWhat")
    whole = calibrated.calibration_ids(tok, ["builtin:arith#40"], n_samples=3, max_length=None,
                                       system="Answer in one word.")
    assert [s[:24] for s in whole] == samples[:3]  # the same rows, in the same order, cut
    assert tok.decode(whole[0]).endswith("<|im_end|>\n") and "<|im_start|>assistant\n" in tok.decode(whole[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_only_methods_fail_before_any_work_on_cpu(tmp_path, monkeypatch):
    from lmforge.pipelines.export import export_main

    # An adapter checkpoint that does not exist on disk: a merge would fail differently, so reaching the
    # GPU error proves the check runs first.
    for method, match in (("fp8", "needs a CUDA GPU with FP8 support"), ("int4", "int4 needs a CUDA GPU.*int8")):
        with pytest.raises(RuntimeError, match=match):
            export_main(ExportArguments(ckpt_dir=str(tmp_path / "missing"), quant_method=method))


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from lmforge.export import quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torchao", "bitsandbytes", "gguf") else real(name, *a))
    for method, match in (("int8", r"torchao package: pip install 'lmforge\[export\]'"),
                          ("bnb", r"bitsandbytes package: pip install 'lmforge\[qlora\]'"),
                          ("gguf", r"gguf package: pip install 'lmforge\[export\]'")):
        with pytest.raises(ImportError, match=match):
            quantize.check_quant_request(method, None, None)


def test_flags_that_do_not_fit_the_method_are_refused():
    from lmforge.export.quantize import check_quant_request

    with pytest.raises(ValueError, match="--quant_type needs --quant_method"):
        check_quant_request(None, "q8_0", None)
    with pytest.raises(ValueError, match="--quant_type q8_0 is for --quant_method gguf"):
        check_quant_request("int8", "q8_0", None)
    with pytest.raises(ValueError, match="--quant_bits 3: bitsandbytes exports 4 or 8"):
        check_quant_request("bnb", None, 3)
    with pytest.raises(ValueError, match="--quant_bits is for --quant_method bnb"):
        check_quant_request("int8", None, 8)
    with pytest.raises(ValueError, match="--quant_bits 3: --quant_method gptq writes 4-bit"):
        check_quant_request("gptq", None, 3, dataset=["builtin:arith"])
    with pytest.raises(ValueError, match="--dataset is the calibration data of --quant_method gptq.awq"):
        check_quant_request("int8", None, None, dataset=["builtin:arith"])
    with pytest.raises(ValueError, match="--quant_n_samples 0"):
        check_quant_request("awq", None, None, dataset=["builtin:arith"], n_samples=0)


# ---------------------------------------------------------------------------------------------- gptq / awq on CPU
# llm-compressor runs on the CPU too (seconds for these models). Each family's source model is calibrated once per
# method on the same 128 builtin:arith rows and scored on held-out arith rows against the source: mean KL(source ||
# export) per token and top-1 agreement, at every position. The tests sharing these exports run on one xdist worker.

CALIBRATION = ["builtin:arith#256"]


def _held_out(tok, n: int = 48) -> list[list[int]]:
    from lmforge.dataset.builtin import generate_arith

    return [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in
            generate_arith(split="test")[:n]]


def _logprobs(model, rows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1) for ids in rows]


def _distance(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    n = sum(r.shape[0] for r in ref)
    kl = sum((r.exp() * (r - g)).sum().item() for r, g in zip(ref, got)) / n
    top1 = sum((r.argmax(-1) == g.argmax(-1)).sum().item() for r, g in zip(ref, got)) / n
    return {"kl": kl, "top1": top1}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """``calibrated(family, method, bits)``: (export folder, distance to the source), each made once per module."""
    pytest.importorskip("llmcompressor")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export_models import make_model
    from lmforge.model.builtin import builtin_model_dir

    root = tmp_path_factory.mktemp("calibrated")
    sources = {"qwen2": lambda: builtin_model_dir("builtin:tiny"), "llama": lambda: make_model("llama", root / "llama", seed=1)}
    done: dict = {}
    refs: dict = {}

    def get(family: str, method: str, bits: int = 4):
        if family not in refs:
            src = sources[family]()
            tok = AutoTokenizer.from_pretrained(src)
            rows = _held_out(tok)
            refs[family] = (src, tok, rows, _logprobs(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                                                      rows))
        src, tok, rows, ref = refs[family]
        key = (family, method, bits)
        if key not in done:
            out = root / f"{family}-{method}{bits}"
            if method == "rtn":  # the baseline: plain round-to-nearest, same scheme, same folder layout
                from lmforge.export.calibrated import calibration_ids, quantize_calibrated

                samples = calibration_ids(tok, CALIBRATION, n_samples=128, max_length=2048)
                out.mkdir()
                quantize_calibrated(src, out, "rtn", samples, tok, quant_bits=bits)
            else:
                from lmforge.pipelines.export import export_main

                export_main(ExportArguments(model=str(src), quant_method=method, quant_bits=bits, dataset=CALIBRATION,
                                            output_dir=str(out)))
            model = AutoModelForCausalLM.from_pretrained(out)
            done[key] = (out, _distance(ref, _logprobs(model, rows)))
        return done[key]

    return get


@pytest.mark.xdist_group("calibrated")
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_export_reloads_and_generates(family, method, calibrated):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    out, dist = calibrated(family, method)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (q["quant_method"], q["format"], q["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (4, 128, "group",
                                                                                                      True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert packed.dtype == torch.int32 and "model.layers.0.mlp.up_proj.weight" not in keys  # 8 int4 values per int32
    assert (out / "args.json").is_file() and (out / "recipe.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 80, 81, 229, 25, 26, 2, 207, 1]])
    assert model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).shape[1] == 17
    # measured KL / top-1 (qwen2, llama): gptq 3.4e-5 / 0.985, 4.8e-5 / 0.960; awq 1.7e-3 / 0.78, 3.0e-3 / 0.49 (random
    # weights give near-uniform logits, so a small shift flips the top token: top-1 is loose for awq)
    max_kl, min_top1 = {"gptq": (3e-4, 0.9), "awq": (1e-2, 0.3)}[method]
    assert dist["kl"] < max_kl and dist["top1"] > min_top1, dist
    reply = HfEngine(ckpt_dir=str(out), device="cpu").infer([InferRequest(messages=[{"role": "user", "content": "hi"}])],
                                                            RequestConfig(max_tokens=4))[0]
    assert reply.choices[0].token_ids  # `lmforge infer --ckpt_dir <export>` runs it


@pytest.mark.xdist_group("calibrated")
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gptq_beats_round_to_nearest(family, calibrated):
    """What GPTQ is for: the same int4 grid as round-to-nearest, a far smaller error.

    Measured KL(source || export) per token, qwen2 / llama: round-to-nearest 1.6e-3 / 3.3e-3, GPTQ 3.4e-5 / 4.8e-5
    (49x / 68x lower; top-1 agreement 0.73 -> 0.98, 0.46 -> 0.96). AWQ 1.7e-3 / 3.0e-3: no better than
    round-to-nearest here. AWQ protects input channels that carry large activations, and these random models have
    none worth protecting (in a side run with a few norm channels scaled up 20x, its KL was 37% below
    round-to-nearest's). The AWQ bound only catches a broken smoothing (scales not compensated), which costs
    orders of magnitude."""
    rtn, gptq, awq = (calibrated(family, m)[1] for m in ("rtn", "gptq", "awq"))
    assert gptq["kl"] * 10 < rtn["kl"] and gptq["top1"] > rtn["top1"], (rtn, gptq)
    assert awq["kl"] < 2 * rtn["kl"], (rtn, awq)


@pytest.mark.xdist_group("calibrated")
def test_gptq_8bit_is_closer_than_4bit(calibrated):
    out, dist8 = calibrated("qwen2", "gptq", 8)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    # measured: 1.3e-7 against 3.4e-5 at 4 bits
    assert weights["num_bits"] == 8 and dist8["kl"] * 20 < calibrated("qwen2", "gptq")[1]["kl"]


def test_awq_refuses_an_architecture_it_has_no_layer_map_for(tmp_path):
    pytest.importorskip("llmcompressor")
    from lmforge.export.calibrated import check_awq_support
    from lmforge.utils.errors import SetupError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SetupError, match="no AWQ layer mapping for GPT2LMHeadModel.*use --quant_method gptq"):
        check_awq_support(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    check_awq_support(tmp_path)


def test_an_adapter_checkpoint_is_merged_then_calibrated_from_the_command_line(tmp_path):
    pytest.importorskip("llmcompressor")
    from test_infer_hf import make_lora_checkpoint

    from lmforge.cli.main import main

    ckpt = make_lora_checkpoint(tmp_path / "run", seed=5)
    assert main(["export", "--ckpt_dir", str(ckpt), "--quant_method", "gptq", "--dataset", "builtin:arith#64",
                 "--quant_n_samples", "32"]) == 0
    (out,) = (tmp_path / "run").glob("export-checkpoint-5-*-gptq-w4a16")  # the one output rule
    assert not list((tmp_path / "run").glob(".lmforge-merge-*"))  # the scratch merge is gone
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert json.loads((out / "args.json").read_text())["system"] == "You are a careful calculator."
    card = (out / "README.md").read_text()
    assert "--quant_method gptq --dataset 'builtin:arith#64' --quant_n_samples 32" in card
