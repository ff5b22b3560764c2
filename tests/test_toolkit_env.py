"""``lmforge env``: the report on this (CPU) machine, exit status 1 with the fix when a required package is
broken, and the known-bad combinations judged from real package metadata."""
from __future__ import annotations

import json
import sys

import pytest

from lmforge.cli.main import main
from lmforge.toolkit import env


@pytest.fixture(scope="module")
def report() -> dict:
    return env.collect()


def test_report_on_this_machine(report):
    assert report["ok"], report["findings"]
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    t = report["torch"]
    import torch

    assert t["version"] == torch.__version__ and t["cuda_available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert t["gpus"] == [] and "bf16" not in t
    pkgs = {p["name"]: p for p in report["packages"]}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers"):
        assert pkgs[name]["required"] and pkgs[name]["imports"] is True and pkgs[name]["version"]
    for name in ("flash-attn", "liger-kernel", "bitsandbytes", "deepspeed", "vllm", "gradio", "gguf", "torchao",
                 "sentence-transformers", "pillow"):
        p = pkgs[name]
        assert not p["required"]
        assert (p["version"] is None) == (p["imports"] is None)  # only installed packages are imported
    assert {"output", "lmforge cache", "hub cache"} <= set(report["disk"])
    json.dumps(report)  # JSON-safe as --json prints it


def test_cli_json_and_exit_status(capsys, monkeypatch, tmp_path):
    assert main(["env", "--json", "--output_dir", str(tmp_path / "out")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["disk"]["output"]["path"] == str(tmp_path / "out")
    # a required package that is installed but does not import: exit 1, the package and the fix named
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    assert main(["env"]) == 1
    text = capsys.readouterr().out
    assert "peft" in text and "does not import" in text and "fix: pip install --force-reinstall" in text
    assert text.rstrip().endswith("NOT READY: fix the errors above")


def test_stack_requirements_from_metadata():
    # transformers' own metadata pins tokenizers; an old tokenizers beside it is an error naming the range
    found = env.stack_findings({"transformers": env._version("transformers"), "tokenizers": "0.19.1"})
    assert len(found) == 1 and found[0].level == "error"
    assert "tokenizers" in found[0].what and "0.19.1" in found[0].what and found[0].fix.startswith("pip install 'tokenizers")
    installed = {d: v for d in env.STACK if (v := env._version(d))}
    assert env.stack_findings(installed) == []


def test_gpu_combinations():
    cpu_machine_cuda_build = {"installed": True, "version": "2.9.0+cu128", "cuda": "12.8", "cuda_available": False,
                              "nvidia_smi_gpus": 0, "gpus": []}
    [f] = env.gpu_findings(cpu_machine_cuda_build, {})
    assert f.level == "warn" and "no GPU is visible" in f.what
    old_driver = {**cpu_machine_cuda_build, "nvidia_smi_gpus": 2, "driver": "535.54", "driver_cuda": "12.2"}
    [f] = env.gpu_findings(old_driver, {})
    assert f.level == "error" and "CUDA 12.8" in f.what and "12.2" in f.what and "driver" in f.fix
    cpu_build_gpu_machine = {"installed": True, "version": "2.9.0+cpu", "cuda": None, "hip": None,
                             "cuda_available": False, "nvidia_smi_gpus": 1, "driver_cuda": "12.4", "gpus": []}
    assert [f.level for f in env.gpu_findings(cpu_build_gpu_machine, {})] == ["error"]
    t4 = {"installed": True, "version": "2.9.0+cu126", "cuda": "12.6", "cuda_available": True,
          "gpus": [{"index": 0, "name": "Tesla T4", "memory_gib": 14.6, "compute_capability": "7.5"}]}
    [f] = env.gpu_findings(t4, {})
    assert f.level == "warn" and "bfloat16" in f.what and "float16" in f.fix
    no_gpu = {"installed": True, "version": "2.9.0+cpu", "cuda": None, "cuda_available": False, "gpus": []}
    assert [f.level for f in env.gpu_findings(no_gpu, {"bitsandbytes": "0.45"})] == ["info"]


def test_disk_and_tokenizer_folder(tmp_path):
    disk = {"output": {"path": "/x", "free_gib": 0.4}, "hub cache": {"path": "/y", "free_gib": 3.0},
            "lmforge cache": {"path": "/z", "free_gib": 100.0}}
    levels = {f.what.split(" ")[0]: f.level for f in env.disk_findings(disk, 5.0)}
    assert levels == {"output": "error", "hub": "warn"}
    assert env.free_bytes(tmp_path / "not" / "yet" / "made") > 0  # measured where it will be created
    from lmforge.model import builtin_model_dir

    folder = str(builtin_model_dir("builtin:tiny"))
    [f] = env.model_findings(folder, {"transformers": "4.57.1"})
    assert f.level == "error" and "TokenizersBackend" in f.what and "lmforge export" in f.fix
    assert [f.level for f in env.model_findings(folder, {"transformers": "5.24.0"})] == ["info"]
