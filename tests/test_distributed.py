"""N processes train the same model as one: DDP and FSDP2 on CPU (gloo), through the real launchers.

2 processes x batch 4 (x gradient accumulation) against 1 process x batch 8 on the same data, for full
fine-tuning and LoRA: the per-step losses and the final weights agree to float32 rounding, because the
loss is normalised over the labelled tokens of the global batch. An FSDP run's sharded checkpoint
resumes in one process (another world size) to the same weights, and its consolidated last checkpoint
is a plain transformers folder. LoRA dropout is 0 here: random dropout masks cannot agree between
different numbers of processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli.launch import torchrun_argv

COMMON = ["--model", "builtin:tiny", "--dataset", "builtin:arith#400", "--warmup_ratio", "0", "--max_steps", "10",
          "--logging_steps", "1", "--save_steps", "5", "--report_to", "none", "--plot", "false",
          "--add_version", "false", "--seed", "7"]
FULL = ["--train_type", "full", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "1"]
LORA = ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--learning_rate", "1e-2",
        "--gradient_accumulation_steps", "2"]


# ---------------------------------------------------------------------------------------------- fast checks

def test_nproc_per_node_relaunches_under_torchrun():
    argv = torchrun_argv("sft", ["--model", "m"], {"NPROC_PER_NODE": "4"})
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in argv and "--standalone" in argv
    assert argv[-5:] == ["-m", "lmforge.cli.main", "sft", "--model", "m"]
    multi = torchrun_argv("rlhf", [], {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1",
                                      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"})
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29555"} <= set(multi)
    assert "--standalone" not in multi


def test_no_relaunch_inside_a_launcher_or_for_inference():
    assert torchrun_argv("sft", [], {}) is None
    assert torchrun_argv("sft", [], {"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"}) is None  # already launched
    assert torchrun_argv("infer", [], {"NPROC_PER_NODE": "2"}) is None  # inference: --data_parallel_size
    with pytest.raises(ValueError, match="NPROC_PER_NODE"):
        torchrun_argv("sft", [], {"NPROC_PER_NODE": "two"})
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        torchrun_argv("sft", [], {"NPROC_PER_NODE": "2", "NNODES": "2"})


def test_parallel_flags_fail_before_anything_loads():
    from lmforge.arguments import TrainArguments
    from lmforge.trainers.distributed import fsdp_kwargs, parallel_training_kwargs

    def kw(**a):
        return parallel_training_kwargs(TrainArguments(model="m", **a), on_gpu=False)

    with pytest.raises(ValueError, match="choose one"):
        kw(fsdp="full_shard", deepspeed="zero2")
    with pytest.raises(ValueError, match="expected one of"):
        kw(fsdp="full_shard shard_grad_op")
    with pytest.raises(ValueError, match="without --fsdp"):
        kw(fsdp_config='{"activation_checkpointing": true}')
    with pytest.raises(ValueError, match="NNODES"):
        kw(fsdp="hybrid_shard")
    with pytest.raises((RuntimeError, ValueError), match="DeepSpeed|GPU|file"):
        kw(deepspeed="zero3")
    cfg = fsdp_kwargs("shard_grad_op offload", '{"fsdp_activation_checkpointing": true}')["fsdp_config"]
    assert cfg == {"activation_checkpointing": True, "version": 2, "reshard_after_forward": False,
                   "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "SHARDED_STATE_DICT",
                   "cpu_offload": True}
    assert kw()["ddp_find_unused_parameters"] is False


def test_deepspeed_presets_are_valid_json():
    from lmforge.trainers.distributed import DEEPSPEED_PRESETS, PRESET_DIR

    for name in DEEPSPEED_PRESETS:
        cfg = json.loads((PRESET_DIR / f"{name}.json").read_text())
        assert cfg["zero_optimization"]["stage"] in (2, 3)
        assert cfg["train_micro_batch_size_per_gpu"] == "auto"  # filled from the Trainer's arguments


# ---------------------------------------------------------------------------------------------- gloo runs

def _run(cmd: list[str], cwd: Path, nproc: int | None = None) -> None:
    """Run a command line; ``nproc`` sets NPROC_PER_NODE (lmforge re-launches itself under torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NPROC_PER_NODE", None)
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


def _sft(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli.main", "sft", *COMMON, *args]


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lmforge.cli.main", "sft", *COMMON, *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process and two processes (NPROC_PER_NODE, plain torchrun, accelerate launch) for full and LoRA,
    DDP and FSDP2."""
    d = tmp_path_factory.mktemp("dist")
    _run(_sft([*FULL, "--per_device_train_batch_size", "8", "--output_dir", "one_full"]), d)
    _run(_sft([*FULL, "--per_device_train_batch_size", "4", "--output_dir", "ddp_full"]), d, nproc=2)
    _run(_torchrun([*FULL, "--per_device_train_batch_size", "4", "--output_dir", "fsdp_full", "--fsdp", "full_shard"]),
         d)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmforge.cli.main", "sft",
          *COMMON, *FULL, "--per_device_train_batch_size", "4", "--output_dir", "accelerate_full"], d)
    _run(_sft([*LORA, "--per_device_train_batch_size", "4", "--output_dir", "one_lora"]), d)
    _run(_sft([*LORA, "--per_device_train_batch_size", "2", "--output_dir", "ddp_lora"]), d, nproc=2)
    _run(_sft([*LORA, "--per_device_train_batch_size", "2", "--output_dir", "fsdp_lora", "--fsdp", "full_shard"]), d,
         nproc=2)
    return d


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(ckpt / name))


def _assert_same_weights(a: dict, b: dict, atol: float) -> float:
    import torch

    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=f"{k}: worst {worst:.2e}")
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp_full", "fsdp_full", "accelerate_full", "ddp_lora", "fsdp_lora"])
def test_two_processes_train_the_same_model_as_one(runs, kind):
    one = runs / ("one_full" if kind.endswith("full") else "one_lora")
    ref, got = _losses(one), _losses(runs / kind)
    assert len(ref) == len(got) == 10
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    worst = _assert_same_weights(_weights(one / "checkpoint-10"), _weights(runs / kind / "checkpoint-10"), atol=5e-5)
    print(f"{kind}: per-step loss rel. diff <= {rel:.1e}, final weights max abs diff {worst:.1e}")
    assert rel <= 1e-5
    # one process speaks for the run: one log line per step, not one per rank
    assert [x.get("step") for x in map(json.loads, (runs / kind / "logging.jsonl").read_text().splitlines())
            if "loss" in x] == list(range(1, 11))


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_the_last_is_a_plain_model(runs):
    import torch
    from transformers import AutoModelForCausalLM

    assert (runs / "fsdp_full" / "checkpoint-5" / "pytorch_model_fsdp_0").is_dir()
    assert not (runs / "fsdp_full" / "checkpoint-5" / "model.safetensors").exists()
    last = runs / "fsdp_full" / "checkpoint-10"
    model = AutoModelForCausalLM.from_pretrained(str(last))  # plain transformers, no lmforge, no FSDP
    ref = AutoModelForCausalLM.from_pretrained(str(runs / "one_full" / "checkpoint-10"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(runs / "fsdp_full" / "checkpoint-5", run / "checkpoint-5")
    shutil.copy(runs / "fsdp_full" / "args.json", run / "args.json")
    _run(_sft([*FULL, "--per_device_train_batch_size", "8", "--output_dir", str(run), "--fsdp", "full_shard",
               "--resume_from_checkpoint", str(run / "checkpoint-5")]), tmp_path, nproc=1)
    assert _losses(run) == pytest.approx(_losses(runs / "one_full")[5:], rel=1e-5)
    _assert_same_weights(_weights(runs / "one_full" / "checkpoint-10"), _weights(run / "checkpoint-10"), atol=5e-5)


DPO = ["--rlhf_type", "dpo", "--model", "builtin:tiny", "--dataset", "builtin:arith-preference#200", "--train_type",
       "lora", "--lora_rank", "4", "--lora_dropout", "0", "--learning_rate", "1e-2", "--warmup_ratio", "0",
       "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3", "--report_to", "none", "--plot", "false",
       "--add_version", "false", "--gradient_accumulation_steps", "1"]


def _rlhf_one_vs_two(tmp_path: Path, flags: list[str], keys: tuple[str, ...], rel: float) -> list[tuple]:
    """``lmforge rlhf`` with 1 process x batch 4 and 2 processes x batch 2: the logged ``keys`` agree at every
    step and the runs end at the same weights; returns the one-process run's values."""
    def rlhf(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "lmforge.cli.main", "rlhf", *flags, *args]

    _run(rlhf(["--per_device_train_batch_size", "4", "--output_dir", "one"]), tmp_path)
    _run(rlhf(["--per_device_train_batch_size", "2", "--output_dir", "two"]), tmp_path, nproc=2)

    def logs(run: str) -> list[tuple]:
        lines = [json.loads(x) for x in (tmp_path / run / "logging.jsonl").read_text().splitlines()]
        return [tuple(x[k] for k in keys) for x in lines if "loss" in x]

    one, two = logs("one"), logs("two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=rel, abs=1e-6)
    _assert_same_weights(_weights(tmp_path / "one" / "checkpoint-3"), _weights(tmp_path / "two" / "checkpoint-3"),
                         atol=5e-5)
    return one


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one(tmp_path):
    one = _rlhf_one_vs_two(tmp_path, DPO, ("loss", "rewards/accuracies", "rewards/margins"), rel=1e-5)
    assert one[-1][2] != 0  # the adapters moved: the margins are not trivially equal


SPREAD_REWARD = '''
from lmforge.registry import REWARDS


@REWARDS.register("distinct_chars")
def distinct_chars(completions, **kwargs):
    """Distinct characters of each reply / 10: an untrained model's replies differ, so groups have spread."""
    return [len(set(c)) / 10 for c in completions]
'''


@pytest.mark.slow
def test_grpo_on_two_processes_matches_one(tmp_path):
    """Each prompt's samples are seeded by (seed, step, prompt), so the 2 processes roll out what one does;
    group advantages, the loss and the update then agree."""
    plugin = tmp_path / "spread_reward.py"
    plugin.write_text(SPREAD_REWARD)
    grpo = ["--rlhf_type", "grpo", "--model", "builtin:tiny", "--dataset", "builtin:arith-rl#64",
            "--external_plugins", str(plugin), "--reward_funcs", "distinct_chars", "--num_generations", "4",
            "--max_completion_length", "8", "--train_type", "full", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3", "--report_to", "none", "--plot", "false",
            "--add_version", "false", "--gradient_accumulation_steps", "1", "--temperature", "1.0", "--seed", "3"]

    one = _rlhf_one_vs_two(tmp_path, grpo, ("loss", "reward", "reward_std"), rel=1e-4)
    assert all(r[2] > 0 for r in one)  # groups with spread: a real signal


def test_one_process_on_a_multi_gpu_host_trains_on_one_gpu(caplog):
    """Never nn.DataParallel (it broke compiled lean layers on a 2-GPU H200 host): one GPU, and the launch
    command for all of them in the log."""
    import logging
    from types import SimpleNamespace

    from lmforge.pipelines.sft import one_gpu_per_process

    targs = SimpleNamespace(_n_gpu=2, n_gpu=2, device="cuda:0")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        one_gpu_per_process(targs, on_gpu=True)
    assert targs._n_gpu == 1 and "NPROC_PER_NODE=2" in caplog.text
    cpu = SimpleNamespace(_n_gpu=0, n_gpu=0, device="cpu")
    assert one_gpu_per_process(cpu, on_gpu=False)._n_gpu == 0


def _stop_agreement_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist
    from transformers import TrainerControl, TrainerState

    from lmforge.trainers.callbacks import InterruptCallback

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cb, state = InterruptCallback(), TrainerState()
        stopped_at = None
        for step in range(1, 8):
            state.global_step = step
            if rank == 1 and step == 3:
                cb.requested = True  # what the SIGINT handler sets, on one rank only
            control = cb.on_step_end(None, state, TrainerControl())
            if control.should_training_stop:
                stopped_at = step
                break
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"stopped_at": stopped_at, "save": control.should_save}))
    finally:
        tdist.destroy_process_group()


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Ctrl-C reaching one process: the request is summed over ranks at a step end and read at the next one
    (so the host need not wait for the GPU), and every rank saves and stops at that same step."""
    import torch.multiprocessing as mp

    mp.spawn(_stop_agreement_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"stopped_at": 4, "save": True}
