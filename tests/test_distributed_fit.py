"""A model that cannot train on the machine's GPUs, even sharded, is refused before its weights load."""
from __future__ import annotations

import types

import pytest

from lmforge.trainers.distributed import check_model_fits, does_not_fit
from lmforge.trainers.memory import GiB, ModelShape, TrainPlan
from lmforge.utils.errors import SetupError

# Qwen2.5-14B's shape (48 layers, hidden 5120, 14.8e9 parameters) and Llama-3-70B's (80 layers, 70.6e9)
SHAPE_14B = ModelShape(layers=48, hidden=5120, intermediate=13824, kv_width=1024, vocab=152064,
                       params=14_770_000_000, linear_params=13_210_000_000, layer_params=275_000_000)
SHAPE_70B = ModelShape(layers=80, hidden=8192, intermediate=28672, kv_width=1024, vocab=128256,
                       params=70_550_000_000, linear_params=68_450_000_000, layer_params=855_000_000)
H100 = 80 * GiB


def test_full_fine_tune_of_14b_needs_sharding_on_80gb_gpus():
    one = TrainPlan(train_type="full", trainable=SHAPE_14B.params, world=1)
    reason = does_not_fit(SHAPE_14B, one, H100)
    assert reason and "per GPU" in reason and "--fsdp full_shard" in reason and "--train_type lora" in reason
    # plain DDP on 8 GPUs holds the same states on each: still refused
    assert does_not_fit(SHAPE_14B, TrainPlan(train_type="full", trainable=SHAPE_14B.params, world=8), H100)
    # FSDP full_shard over 2 GPUs divides weights, gradients and optimizer states: allowed
    assert does_not_fit(SHAPE_14B, TrainPlan(train_type="full", trainable=SHAPE_14B.params, world=2,
                                             fsdp="full_shard"), H100) is None
    # LoRA on one GPU: the frozen base and small adapters fit
    assert does_not_fit(SHAPE_14B, TrainPlan(train_type="lora", trainable=50_000_000, world=1), H100) is None


def test_weights_that_cannot_be_loaded_whole_are_refused_even_sharded():
    plan = TrainPlan(train_type="full", trainable=SHAPE_70B.params, world=8, fsdp="full_shard")
    reason = does_not_fit(SHAPE_70B, plan, H100)
    assert reason and "weights alone" in reason and "loads them whole" in reason


def test_the_check_runs_on_the_meta_device_before_the_load(monkeypatch):
    """builtin:tiny full fine-tune against a pretend 1 MiB GPU: refused with the numbers; with 80 GiB, allowed."""
    import torch

    from lmforge import TrainArguments

    args = TrainArguments(model="builtin:tiny", dataset=["builtin:arith"], train_type="full", report_to=["none"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=2 ** 20))
    with pytest.raises(SetupError, match=r"builtin:tiny does not fit: .*GiB"):
        check_model_fits(args, "sft", 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=H100))
    check_model_fits(args, "sft", 1)


def test_activation_offloading_leaves_two_layers_of_activations_in_the_estimate():
    from lmforge.trainers.memory import TrainPlan, estimate

    plan = dict(train_type="full", trainable=SHAPE_14B.params, tokens=16384)
    base, off = estimate(SHAPE_14B, TrainPlan(**plan)), estimate(SHAPE_14B, TrainPlan(**plan, offloading=True))
    per_layer = base["activation_bytes_per_token_per_layer"]
    assert off["activations"] < base["activations"] / 10 and off["peak"] < base["peak"]
    assert off["activations"] >= 2 * 16384 * per_layer  # the working layer and one in flight stay
    ck = estimate(SHAPE_14B, TrainPlan(**plan, checkpointing=True, offloading=True))
    assert ck["activations"] < off["activations"]  # checkpointed layers keep only their inputs
