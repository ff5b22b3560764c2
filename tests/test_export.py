"""``lmforge export --merge_lora true`` / ``merge-lora``: a standalone model equal to base + adapter."""
from __future__ import annotations

import json

import pytest

from lmforge.arguments import ExportArguments
from test_infer_hf import make_lora_checkpoint, one_torch_thread  # noqa: F401 - fixture


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
