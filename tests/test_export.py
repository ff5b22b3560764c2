"""``lmforge export --merge_lora true`` / ``merge-lora``: a standalone model equal to base + adapter."""
from __future__ import annotations

import json

import pytest

from lmforge.arguments import ExportArguments
from test_infer_hf import make_lora_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_lora_checkpoint(tmp_path_factory.mktemp("run"), seed=3)


@pytest.fixture(scope="module")
def merged(ckpt):
    import os

    from lmforge.cli.main import main

    old = os.umask(0o022)
    try:
        assert main(["export", "--ckpt_dir", str(ckpt), "--merge_lora", "true"]) == 0
    finally:
        os.umask(old)
    # the output rule: export-<checkpoint>-<time> in the checkpoint's run folder
    (out,) = ckpt.parent.glob("export-checkpoint-5-*")
    return out


def test_merged_folder_is_a_plain_model(merged):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "args.json"} <= names
    assert not any(n.startswith(".") for n in names) and not list(merged.parent.glob(".*tmp*"))
    assert "adapter_config.json" not in names
    # under umask 022 everyone can read the weights (safetensors itself writes 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in merged.iterdir()} == {"0o644"}
    assert merged.stat().st_mode & 0o777 == 0o755
    config = json.loads((merged / "config.json").read_text())
    assert config["use_cache"] is True and "lmforge_model" not in config
    args = json.loads((merged / "args.json").read_text())
    assert args["system"] == "You are a careful calculator." and args["train_type"] == "full"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template and model.generation_config.eos_token_id is not None
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_merged_model_answers_like_base_plus_adapter(ckpt, merged):
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    cfg = RequestConfig(max_tokens=24)
    msgs = [{"role": "user", "content": "What is 37 + 45?"}]
    with_adapter = HfEngine(ckpt_dir=str(ckpt), device="cpu")
    expected = with_adapter.infer([InferRequest(messages=msgs, adapter="checkpoint-5")], cfg)[0]
    base = with_adapter.infer([InferRequest(messages=msgs, adapter="")], cfg)[0]  # "": the base explicitly
    assert with_adapter.infer([InferRequest(messages=msgs)], cfg)[0].choices[0].token_ids == \
        expected.choices[0].token_ids  # an adapter --ckpt_dir answers with its adapter by default
    merged_engine = HfEngine(ckpt_dir=str(merged), device="cpu")
    got = merged_engine.infer([InferRequest(messages=msgs)], cfg)[0]
    assert merged_engine.template.system == with_adapter.template.system  # carried by args.json
    assert got.choices[0].token_ids == expected.choices[0].token_ids != base.choices[0].token_ids


def test_merge_lora_command_to_a_chosen_folder_replaces_it(ckpt, tmp_path):
    from lmforge.pipelines.export import merge_lora_main

    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = merge_lora_main(ExportArguments(model="builtin:tiny", adapters=[str(ckpt)], output_dir=str(out)))
    assert result == {"output_dir": str(out)}
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()


def test_nothing_to_merge_is_a_clear_error(merged):
    from lmforge.pipelines.export import export_main

    with pytest.raises(ValueError, match="nothing to merge"):
        export_main(ExportArguments(ckpt_dir=str(merged), merge_lora=True))
    with pytest.raises(ValueError, match="--merge_lora true"):
        export_main(ExportArguments(ckpt_dir=str(merged)))


def _lora_checkpoint(root, *, init_zero: bool, bits: int | None = None, seed: int = 0):
    """checkpoint-1 of a run on builtin:tiny: LoRA (or QLoRA on a ``bits`` base) with zero or random B."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from lmforge.arguments import TrainArguments, save_args
    from lmforge.model import get_model_tokenizer

    quant = None
    if bits:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model, _ = get_model_tokenizer("builtin:tiny", device="cpu", quantization_config=quant,
                                   device_map="cpu" if bits else None)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=init_zero))
    ckpt = root / "checkpoint-1"
    peft_model.save_pretrained(ckpt)
    save_args(TrainArguments(model="builtin:tiny", train_type="qlora" if bits else "lora", quant_bits=bits or 4), root)
    return ckpt


def test_a_merge_that_changes_no_weight_is_an_error(tmp_path):
    from lmforge.pipelines.export import export_main

    ckpt = _lora_checkpoint(tmp_path / "run", init_zero=True)  # peft's default init: B = 0
    with pytest.raises(ValueError, match="would change no weight.*B matrices are all zero"):
        export_main(ExportArguments(ckpt_dir=str(ckpt), merge_lora=True))
    assert not ckpt.with_name("checkpoint-1-merged").exists() and not list(ckpt.parent.glob(".*tmp*"))


def test_a_delta_lost_to_bf16_rounding_is_an_error(tmp_path):
    import torch
    from peft.tuners.lora import LoraLayer

    from lmforge.export.merge import check_merge_changes
    from lmforge.infer.checkpoint import attach_adapters
    from lmforge.model import get_model_tokenizer

    ckpt = _lora_checkpoint(tmp_path / "run", init_zero=False)
    base, _ = get_model_tokenizer("builtin:tiny", device="cpu", torch_dtype="bfloat16")
    peft_model = attach_adapters(base, {"a": str(ckpt)})
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["a"].weight.mul_(1e-12)  # |delta| ~1e-13: far below bf16's step for weights ~1e-2
    with pytest.raises(ValueError, match="below the rounding step of the bfloat16 base weights"):
        check_merge_changes(peft_model, ["a"])
    assert check_merge_changes(attach_adapters(get_model_tokenizer("builtin:tiny", device="cpu")[0],
                                               {"a": str(ckpt)}), ["a"])["changed"] > 0


def test_qlora_adapter_is_merged_into_the_dequantised_base(tmp_path):
    """The merged model answers as the 4-bit base + adapter that training saw, not as full-precision base + adapter."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lmforge.infer.checkpoint import attach_adapters
    from lmforge.model.builtin import builtin_model_dir
    from lmforge.pipelines.export import export_main

    ckpt = _lora_checkpoint(tmp_path / "run", init_zero=False, bits=4, seed=5)
    out = export_main(ExportArguments(ckpt_dir=str(ckpt), merge_lora=True))["output_dir"]
    config = json.loads((tmp_path / "run" / "checkpoint-1-merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 80, 81, 229, 25, 26, 2, 207, 1]])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with torch.no_grad():
        trained = attach_adapters(AutoModelForCausalLM.from_pretrained(
            builtin_model_dir("builtin:tiny"), quantization_config=quant, device_map="cpu", dtype=torch.float32),
            {"a": str(ckpt)})(ids).logits
        full = attach_adapters(AutoModelForCausalLM.from_pretrained(builtin_model_dir("builtin:tiny")),
                               {"a": str(ckpt)})(ids).logits
        got = merged(ids).logits
    # bitsandbytes' CPU kernels compute in bf16 (~5e-3 here); the full-precision base is ~30x further off
    assert (got - trained).abs().max() * 10 < (got - full).abs().max()


def test_v4_tokenizer_config_has_what_transformers_4_reads(merged):
    """Fields transformers 4.x's PreTrainedTokenizerFast takes from tokenizer_config.json (checked by hand
    against transformers 4.57.1 loading this folder); transformers 5 still loads the same tokenizer."""
    from transformers import AutoTokenizer

    cfg = json.loads((merged / "tokenizer_config.json").read_text())
    tok_json = json.loads((merged / "tokenizer.json").read_text())
    added = {str(t["id"]): t for t in tok_json["added_tokens"]}
    assert cfg["tokenizer_class"] in ("PreTrainedTokenizerFast", "Qwen2Tokenizer")  # classes 4.x has
    assert "backend" not in cfg and not isinstance(cfg.get("extra_special_tokens"), list)
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == (merged / "chat_template.jinja").read_text()
    assert set(cfg["added_tokens_decoder"]) == set(added)
    for i, entry in cfg["added_tokens_decoder"].items():
        assert entry["content"] == added[i]["content"] and entry["special"] == added[i]["special"]
        assert set(entry) == {"content", "lstrip", "normalized", "rstrip", "single_word", "special"}
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == cfg["chat_template"]


def test_v4_config_turns_the_v5_only_fields_into_v4_ones(tmp_path):
    from transformers import AutoTokenizer

    from lmforge.export.tokenizer_v4 import write_v4_tokenizer_config
    from lmforge.model.builtin import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, extra_special_tokens=["<tool_call>", "</tool_call>"])
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "TokenizersBackend" and saved["extra_special_tokens"] == ["<tool_call>",
                                                                                                 "</tool_call>"]
    write_v4_tokenizer_config(tmp_path, tok)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in cfg
    assert cfg["additional_special_tokens"] == ["<tool_call>", "</tool_call>"]
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("<tool_call>x")["input_ids"] == tok("<tool_call>x")["input_ids"]
    assert again.chat_template == tok.chat_template
