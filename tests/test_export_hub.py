"""``--push_to_hub``: the generated model card, and the errors that come before any work.

No test uploads anything (there is no network here); the checks are the card's content and that an
upload which cannot succeed fails in a second, before a merge or a quantisation has been paid for.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from lmforge.arguments import ExportArguments


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_card_says_where_the_model_came_from(tmp_path):
    from lmforge.export.hub import command_line, find_eval_report, model_card

    run = tmp_path / "run"
    (run / "checkpoint-9" / "eval").mkdir(parents=True)
    (run / "checkpoint-9" / "eval" / "eval_report.json").write_text(json.dumps(
        {"target": "checkpoint-9", "datasets": {"builtin:arith": {"rows": 50, "metrics": {"acc": 0.62, "n": 50}}}}))
    train = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "train_type": "lora", "dataset": ["AI-ModelScope/alpaca#500",
             "data/mine.jsonl"], "system": "Be kind.", "hub_token": "hf_secret_from_training"}
    args = ExportArguments(ckpt_dir=str(run / "checkpoint-9"), quant_method="gguf", quant_type="q4_k_m",
                           push_to_hub=True, hub_model_id="me/calc-gguf", hub_token="hf_secret")
    cmd = command_line(args, ExportArguments())
    assert cmd.startswith("lmforge export --ckpt_dir ") and "--quant_type q4_k_m --push_to_hub true" in cmd
    card = model_card(base_model=train["model"], train_args=train, export_command=cmd, fmt="gguf",
                      files=["checkpoint-9-q4_k_m.gguf"], repo_id=args.hub_model_id,
                      eval_report=find_eval_report(args.ckpt_dir))
    meta, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in meta and "library_name: gguf" in meta
    assert "datasets:\n- AI-ModelScope/alpaca\n" in meta and "data/mine.jsonl" not in meta  # hub ids only
    assert "# calc-gguf" in body and "Fine-tuning: lora" in body and "System prompt: `Be kind.`" in body
    assert "`AI-ModelScope/alpaca#500`, `data/mine.jsonl`" in body and cmd in body
    assert "| builtin:arith | acc | 0.6200 |" in body and "llama-cli -m checkpoint-9-q4_k_m.gguf" in body
    assert "secret" not in card
    # without a repository id: the GGUF file names the card, or the base model and the format for a folder
    for files, fmt, title in ((["config.json", "checkpoint-9-q4_k_m.gguf"], "gguf", "# checkpoint-9-q4_k_m\n"),
                              (["args.json", "config.json", "model.safetensors"], "gptq", "# Qwen2.5-0.5B-Instruct-gptq\n")):
        assert title in model_card(base_model=train["model"], train_args=train, export_command=cmd, fmt=fmt, files=files)


def test_merge_writes_a_card_beside_the_weights(tmp_path):
    from test_infer_hf import make_lora_checkpoint

    from lmforge.pipelines.export import export_main

    ckpt = make_lora_checkpoint(tmp_path / "run", seed=2)
    out = export_main(ExportArguments(ckpt_dir=str(ckpt), merge_lora=True))["output_dir"]
    card = (Path(out) / "README.md").read_text()
    assert Path(out).parent == tmp_path / "run" and Path(out).name.startswith("export-checkpoint-5-")
    assert "Base model: `builtin:tiny`" in card
    assert "`model.safetensors`" in card and "--merge_lora true" in card


@pytest.mark.parametrize("env, match", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, r"cannot reach the hf hub \(127.0.0.1:\d+ unreachable"),
])
def test_push_that_cannot_succeed_fails_before_any_work(env, match, monkeypatch, tmp_path):
    from lmforge.pipelines.export import export_main

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(port=_closed_port()))
    # The checkpoint does not exist: reaching the hub error proves nothing was loaded or merged first.
    with pytest.raises(RuntimeError, match=match):
        export_main(ExportArguments(ckpt_dir=str(tmp_path / "nope"), merge_lora=True, quant_method="gguf",
                                    push_to_hub=True, hub_model_id="me/x"))


def test_push_needs_a_repo_id_and_modelscope_its_client(monkeypatch):
    import importlib.util

    from lmforge.export import hub

    with pytest.raises(ValueError, match="--hub_model_id as owner/name"):
        hub.check_push("hf", None)
    with pytest.raises(ValueError, match="owner/name"):
        hub.check_push("hf", "just-a-name")
    if importlib.util.find_spec("modelscope") is None:
        with pytest.raises(ImportError, match=r"modelscope package: pip install 'lmforge\[modelscope\]'"):
            hub.check_push("modelscope", "me/x")
