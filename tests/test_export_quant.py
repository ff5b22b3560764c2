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


@pytest.mark.parametrize("method, match", [
    ("gptq", r"gptqmodel \(pip install gptqmodel\).*lmforge does not drive yet"),
    ("awq", r"pip install llmcompressor"),
])
def test_gptq_and_awq_say_what_they_need(method, match, full_ckpt):
    from lmforge.pipelines.export import export_main

    with pytest.raises(NotImplementedError, match=match):
        export_main(ExportArguments(ckpt_dir=str(full_ckpt), quant_method=method))


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
