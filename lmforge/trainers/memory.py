"""Peak GPU memory of a training step, per device, before anything runs (``--dry_run``).

The estimate is what PyTorch's allocator will hold at its peak (``torch.cuda.max_memory_allocated``);
the CUDA context and the caching allocator's slack come on top (about 0.5-1 GiB, more when batch
shapes vary). Notation: ``d`` bytes per element of the model dtype (2 for bf16/fp16), ``P`` the
model's parameters, ``P_t`` the trainable ones, ``L`` layers, ``h`` hidden size, ``h_kv`` the
key/value width (kv heads x head dim), ``I`` the MLP width, ``V`` the vocabulary, ``N`` tokens in one
micro-batch on one device (rows x padded length), ``n`` the world size.

Static (held all step):

- weights ``W = P d``; QLoRA: ``0.516 P_lin + d' (P - P_lin)`` (NF4 with double quantisation is 4.13
  bits a weight for the decoder's linear layers; the rest -- embeddings, head, norms -- stays in the model
  dtype, ``d' = d``, except on a float16 base, where peft's k-bit preparation casts it to float32, ``d' = 4``);
  LoRA/DoRA adapters add ``4 P_t`` (peft keeps them in float32);
- gradients ``G = P_t g`` with ``g = d`` for full/freeze and 4 for adapters;
- optimizer ``O = 2 P_t s`` for AdamW (two moments in the parameter's dtype: ``s = d`` full, 4 for
  adapters); 8-bit optimizers ``s = 1``; Adafactor and SGD about 0;
- sharding: FSDP ``full_shard``/ZeRO-3 divide W, G and O by ``n`` and add two gathered layers
  (``2 P_layer d``); ``shard_grad_op``/ZeRO-2 divide G and O; ``offload`` moves O (and sharded W) to
  the CPU; plain DDP over ``n > 1`` adds a bucket copy of G.

Activations, bytes per token per layer at ``d = 2`` (``a_layer``), measured with saved-tensor hooks
on Qwen2-architecture models through lmforge's own training path (the fit is exact to 2% over
four shapes; ``tests/test_toolkit_dry_run.py`` re-measures it):

====================  =====================================
full / freeze          20 h + 4 h_kv + 8 I
  lean layers          12 h + 4 h_kv + 6 I
LoRA (all-linear)      16 h + 4 h_kv + 8 I (lean LoRA: each distinct input of the adapted layers once)
  lean layers          12 h + 4 h_kv + 6 I
  lora_dropout > 0     +6 h + I (a 1-byte mask per adapted input element; backward recomputes the dropped input)
  --lean_lora false    +8 h + 0.5 h_kv (peft's bf16 copy of every adapted input); dropout then adds
                       CUDA +6 h + I, CPU +24 h + 4 I (peft drops a float32 copy of the input)
padded batch           +3 h + 3.7 h_kv (the mask sends SDPA to repeat_kv)
====================  =====================================

``A = N (L_plain a_layer + L_ckpt d h + c_out h) d/2`` where checkpointed layers keep only their input
and ``c_out`` (8.5 for full, 0 for adapters) covers the embeddings, the last norm and the fused loss's
saved hidden-state gradient; a checkpointed run recomputes one layer at a time in the backward pass
(``+ N a_layer``). The loss adds, for supervised training with the fused cross-entropy (lmforge's default
on CUDA), one ``[min(N, chunk), V]`` block (4 bytes an element) and a float32 ``V h`` head-gradient
accumulator when the head trains; without it the full logits: ``N V (d + 10)`` (logits, their float32
copy, log-softmax and gradients). Preference training holds ``2 N V (d + 2) + 8 N_lab V`` bytes of logits and GRPO
``N_c V (2 d + 8)`` for its ``N_c`` completion tokens.

Peak = ``W + O + max(A + loss, G_head + A, G + A_out)``: at the end of the forward pass all activations
are alive; at the end of the backward pass all gradients are, and the activations are gone (gradients
are set to None between steps, so G and A overlap only in part).
"""
from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1024 ** 3
NF4_BYTES = 0.516  # 4 bits + 8-bit absmax per 64 + float32 per 256 blocks
# (h, h_kv, I) coefficients: bytes per token per layer at d = 2 (see the table above)
ACT_COEF = {
    ("full", False): (20.0, 4.0, 8.0),
    ("full", True): (12.0, 4.0, 6.0),
    ("adapter", False): (16.0, 4.0, 8.0),
    ("adapter", True): (12.0, 4.0, 6.0),
}
PEFT_FORWARD_COEF = (8.0, 0.5, 0.0)  # --lean_lora false: peft's forward keeps a copy of each adapted input
# the dropout on the LoRA path, by (device, lean LoRA): lean LoRA keeps a bool mask; under peft's forward CUDA's
# fused kernel keeps a bool mask and the CPU kernel a float32 noise tensor (peft casts the input first)
DROPOUT_COEF = {("cuda", True): (6.0, 0.0, 1.0), ("cpu", True): (6.0, 0.0, 1.0),
                ("cuda", False): (6.0, 0.0, 1.0), ("cpu", False): (24.0, 0.0, 4.0)}
PADDED_COEF = (3.0, 3.7, 0.0)
OUTSIDE_COEF = {"full": 8.5, "adapter": 0.0}
EIGHT_BIT_OPTIMS = ("8bit", "bnb")
STATELESS_OPTIMS = ("sgd", "adafactor")
FUSED_CE_BUDGET = 2 ** 28  # elements of one chunk of logits (trainers/fused_ce.py LOGITS_BUDGET)


@dataclasses.dataclass
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    params: int
    linear_params: int  # in the decoder layers' linear modules (quantised by QLoRA)
    layer_params: int  # one decoder layer
    max_positions: int | None = None

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape":
        import torch

        cfg = getattr(model, "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        h = int(cfg.hidden_size)
        heads = int(getattr(cfg, "num_attention_heads", 1))
        head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        layers = int(cfg.num_hidden_layers)
        linear = sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
        params = sum(p.numel() for p in model.parameters())
        embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
        return cls(layers, h, int(getattr(cfg, "intermediate_size", 4 * h)), kv * head_dim, int(cfg.vocab_size),
                   params, linear, max(1, (params - embed) // max(layers, 1)),
                   getattr(cfg, "max_position_embeddings", None))


@dataclasses.dataclass
class TrainPlan:
    train_type: str  # full, freeze, lora, dora, qlora
    trainable: int
    dtype_bytes: int = 2
    tokens: int = 2048  # N: one micro-batch on one device
    labelled_tokens: int | None = None
    padded: bool = True
    objective: str = "sft"  # sft, pt, preference, grpo, task (embedding, classifier, reranker)
    completion_tokens: int = 0  # grpo
    checkpointing: bool = False
    checkpoint_every: int = 1
    offloading: bool = False  # --activation_offloading: saved activations wait in host memory
    lean_layers: bool = True
    fused_ce: bool = True
    lora_dropout: float = 0.0
    lean_lora: bool = True  # --lean_lora (tuners/lean_lora.py)
    float16: bool = False  # a float16 base: QLoRA's non-quantised parameters go to float32 (peft's preparation)
    head_trainable: bool = False
    optim: str = "adamw_torch_fused"
    world: int = 1
    fsdp: str | None = None
    deepspeed: str | None = None
    reference_copy: bool = False  # preference/grpo full fine-tuning keeps a frozen copy of the model
    device: str = "cuda"  # the kernels whose saved tensors are counted (the dry run estimates GPU memory)


def estimate(shape: ModelShape, plan: TrainPlan) -> dict[str, Any]:
    """Bytes per component and the peak (see the module docstring for every term)."""
    d = plan.dtype_bytes
    adapter = plan.train_type in ("lora", "dora", "qlora")
    kind = "adapter" if adapter else "full"
    n = max(1, plan.world)
    # ---- weights, gradients, optimizer
    if plan.train_type == "qlora":
        weights = NF4_BYTES * shape.linear_params + (4 if plan.float16 else d) * (shape.params - shape.linear_params)
    else:
        weights = shape.params * d
    grad_bytes = 4 if adapter else d
    if adapter:
        weights += 4 * plan.trainable
    grads = plan.trainable * grad_bytes
    optim = (plan.optim or "").lower()
    state = 1 if any(k in optim for k in EIGHT_BIT_OPTIMS) else 0 if any(k in optim for k in STATELESS_OPTIMS) \
        else grad_bytes
    opt = 2 * plan.trainable * state
    reference = shape.params * d if plan.reference_copy else 0
    shard = _sharding(plan)
    if shard["params"]:
        weights = weights / n + 2 * shape.layer_params * d
        reference = reference / n
    if shard["grads"]:
        grads /= n
    elif n > 1:
        grads *= 2  # DDP's gradient buckets
    opt = 0 if shard["offload"] else opt / n if shard["optimizer"] else opt
    # ---- activations
    N = plan.tokens
    ch, ckv, ci = ACT_COEF[(kind, plan.lean_layers)]
    if adapter and not plan.lean_lora:
        ch, ckv, ci = ch + PEFT_FORWARD_COEF[0], ckv + PEFT_FORWARD_COEF[1], ci + PEFT_FORWARD_COEF[2]
    if adapter and plan.lora_dropout > 0:
        dh, dkv, di = DROPOUT_COEF[("cpu" if plan.device == "cpu" else "cuda", plan.lean_lora)]
        ch, ckv, ci = ch + dh, ckv + dkv, ci + di
    if plan.padded:
        ch, ckv, ci = ch + PADDED_COEF[0], ckv + PADDED_COEF[1], ci + PADDED_COEF[2]
    scale = d / 2
    per_layer = (ch * shape.hidden + ckv * shape.kv_width + ci * shape.intermediate) * scale
    ckpt_layers = -(-shape.layers // plan.checkpoint_every) if plan.checkpointing else 0
    plain_layers = shape.layers - ckpt_layers
    outside = OUTSIDE_COEF[kind] * shape.hidden * scale * N
    acts = N * (plain_layers * per_layer + ckpt_layers * d * shape.hidden) + outside
    if plan.offloading:  # on the GPU: the layer being computed and the one whose copy is in flight
        acts = N * min(shape.layers, 2) * (per_layer if plain_layers else d * shape.hidden) + outside
    recompute = N * per_layer if ckpt_layers else 0
    # ---- the loss
    n_lab = plan.labelled_tokens if plan.labelled_tokens is not None else N
    V = shape.vocab
    head_grad = 4 * V * shape.hidden if plan.head_trainable else 0
    if plan.objective == "preference":
        loss = 2 * N * V * (d + 2) + 8 * n_lab * V
    elif plan.objective == "grpo":
        loss = plan.completion_tokens * V * (2 * d + 8)
    elif plan.objective == "task":  # pooled vectors or a small head: no vocabulary-wide logits
        loss = 0
    elif plan.fused_ce:
        chunk = max(64, min(8192, FUSED_CE_BUDGET // max(V, 1) // 64 * 64))
        loss = 4 * min(n_lab, chunk) * V + head_grad
    else:
        loss = N * V * (d + 10)
    peak_fwd = acts + loss
    peak_bwd_start = acts + recompute + (V * shape.hidden * grad_bytes if plan.head_trainable else 0)
    peak_bwd_end = grads + outside
    static = weights + opt + reference
    peak = static + max(peak_fwd, peak_bwd_start, peak_bwd_end)
    return {"weights": weights, "gradients": grads, "optimizer": opt, "reference_model": reference,
            "activations": acts, "recompute": recompute, "loss": loss, "peak": peak,
            "activation_bytes_per_token_per_layer": per_layer, "sharding": shard}


def holds_reference_copy(args: Any, command: str) -> bool:
    """Whether an rlhf run holds a second, frozen model beside the policy: a reference that is not the
    policy with its adapters off and not precomputed, or GKD's teacher (counted at the student's size)."""
    if command != "rlhf":
        return False
    if args.rlhf_type == "gkd":
        return True
    needs = args.needs_reference and not args.precompute_ref_log_probs
    return bool(needs and (args.ref_model or not args.is_adapter))


def meta_model_counts(args: Any, adapt: Any = None) -> tuple[ModelShape, dict[str, Any]]:
    """The model of ``args.model`` built on the meta device (no weight read or allocated: a 70B model costs
    nothing) with ``args``'s tuner applied: its shape and parameter counts. ``adapt(model, args)`` may change
    the model first (the reward head of ``rlhf --rlhf_type rm``)."""
    import torch
    from transformers import AutoConfig

    from lmforge.model.hub import resolve_model_dir
    from lmforge.model.loader import _auto_class, resolve_trust_remote_code
    from lmforge.registry import TUNERS

    import transformers

    from lmforge.model.tasks import task_load_kwargs

    trust, _ = resolve_trust_remote_code(args.trust_remote_code, args.model_kwargs)
    folder = resolve_model_dir(args.model, hub=args.hub, revision=args.revision, need_weights=False)
    auto_name, overrides = task_load_kwargs(args)  # an embedding model, classifier or reranker loads another class
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust, **overrides)
    cls = getattr(transformers, auto_name) if auto_name else _auto_class(config)
    dtype = torch.float32 if args.torch_dtype == "float32" else torch.bfloat16
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust)
    if adapt is not None:
        model, args = adapt(model, args)
    shape = ModelShape.from_model(model)
    tuner = "lora" if args.train_type == "qlora" else args.train_type  # the same adapters; the base is quantised
    if tuner not in TUNERS:
        raise ValueError(f"--train_type: {TUNERS.unknown_message(tuner)}")
    tuned = TUNERS.get(tuner)(model, args)
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    total = sum(p.numel() for p in tuned.parameters())
    head = any(p.requires_grad for n, p in tuned.named_parameters() if "lm_head" in n or "embed_tokens" in n)
    return shape, {"total": total, "trainable": trainable, "head_trainable": head}


def deepspeed_name(value: str | None) -> str | None:
    """A DeepSpeed preset name, or one built from a config file's ZeRO stage and offload."""
    if not value or not value.endswith(".json"):
        return value
    import json

    try:
        zero = json.load(open(value, encoding="utf-8")).get("zero_optimization", {})
    except (OSError, ValueError):
        return value
    offload = any((zero.get(k) or {}).get("device") == "cpu" for k in ("offload_optimizer", "offload_param"))
    return f"zero{zero.get('stage', 0)}" + ("_offload" if offload else "")


def _sharding(plan: TrainPlan) -> dict[str, bool]:
    words = (plan.fsdp or "").replace(",", " ").split()
    ds = (plan.deepspeed or "").lower()
    full = "full_shard" in words or "hybrid_shard" in words or ds.startswith("zero3")
    grads_opt = full or "shard_grad_op" in words or ds.startswith("zero2")
    offload = "offload" in words or "offload" in ds
    return {"params": full and plan.world > 1, "grads": grads_opt and plan.world > 1,
            "optimizer": grads_opt and plan.world > 1, "offload": offload}


def format_bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 1024 ** 2:.1f} MiB"
