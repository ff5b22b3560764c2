"""Arguments of the training commands (``sft``, ``pt``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from lmforge.arguments.base import field
from lmforge.arguments.model import DataArguments, ModelArguments, TemplateArguments
from lmforge.arguments.task import TaskTrainArguments


@dataclass
class TunerArguments:
    """Which parameters train."""

    train_type: Literal["lora", "dora", "qlora", "full", "freeze"] = field("lora", "how to train")
    lora_rank: int = field(8, "LoRA rank r")
    lora_alpha: int = field(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = field(0.05, "dropout on the LoRA path")
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                      help="all-linear, module names, or one regex")
    modules_to_save: list[str] = field(default_factory=list, help="modules trained in full beside LoRA (e.g. lm_head)")
    freeze_parameters: list[str] = field(default_factory=list,
                                         help="train_type freeze: name prefixes or regexes to freeze (the rest trains)")
    trainable_parameters: list[str] = field(default_factory=list,
                                            help="name prefixes or regexes that train even if frozen above")
    quant_bits: int = field(4, "bits for qlora (bitsandbytes)")
    freeze_vit: bool = field(True, "vision models: freeze the vision tower (no LoRA on it either)")
    freeze_aligner: bool = field(True, "vision models: freeze the aligner (the projector into the language model)")
    freeze_llm: bool = field(False, "vision models: freeze the language model (train only vision parts)")
    vit_lr: Optional[float] = field(None, "vision models: learning rate of the vision tower (default: --learning_rate)")
    aligner_lr: Optional[float] = field(None, "vision models: learning rate of the aligner (default: --learning_rate)")


@dataclass
class DistributedArguments:
    """Several processes (torchrun, ``NPROC_PER_NODE=N``): plain DDP unless FSDP2 or DeepSpeed ZeRO is chosen."""

    fsdp: Optional[str] = field(
        None, "FSDP2 through accelerate: full_shard, shard_grad_op or hybrid_shard (shard within a node, "
              "replicate across nodes); add 'offload' to keep parameters and optimizer state on the CPU")
    fsdp_config: Optional[str] = field(
        None, "more FSDP settings as JSON or a .json file (transformers' fsdp_config keys, e.g. "
              "'{\"activation_checkpointing\": true}')")
    deepspeed: Optional[str] = field(
        None, "DeepSpeed ZeRO: zero2, zero3, zero3_offload (shipped presets) or a DeepSpeed .json file; "
              "needs pip install 'lmforge[deepspeed]'")
    ddp_backend: Optional[str] = field(None, "process-group backend; default nccl on GPUs, gloo on CPU")
    ddp_timeout: int = field(1800, "seconds a collective may wait for the other processes before failing")
    ddp_find_unused_parameters: Optional[bool] = field(
        None, "DDP: search for parameters without gradients every step (slower; needed only by models that "
              "skip layers)")


@dataclass
class TrainArguments(ModelArguments, DataArguments, TemplateArguments, TunerArguments, DistributedArguments,
                     TaskTrainArguments):
    """Supervised fine-tuning: lmforge sft --model M --dataset D."""

    output_dir: Optional[str] = field(None, "where checkpoints go; default output/<model>/v<N>-<timestamp>")
    add_version: bool = field(True, "append v<N>-<timestamp> to output_dir")
    num_train_epochs: float = field(1.0, "epochs over the training data")
    max_steps: int = field(-1, "stop after this many optimizer steps (-1: use epochs)")
    per_device_train_batch_size: Optional[int] = field(None, "rows per device per step; default 1 on GPU, 4 on CPU")
    per_device_eval_batch_size: Optional[int] = field(None, "rows per device per eval step; default = train batch")
    gradient_accumulation_steps: Optional[int] = field(None, "default: enough for about 16 rows per optimizer step")
    learning_rate: Optional[float] = field(None, "default 1e-4 for lora/dora/qlora, 1e-5 for full/freeze")
    weight_decay: float = field(0.1, "AdamW weight decay")
    lr_scheduler_type: str = field("cosine", "transformers scheduler name")
    warmup_ratio: float = field(0.05, "fraction of steps spent warming up")
    max_grad_norm: float = field(1.0, "gradient clipping")
    optimizer: Optional[str] = field(None, "an lmforge optimizer plugin that builds the optimizer itself (multi_lr: "
                                           "LoRA+-style learning rates, or one from --external_plugins); when set, "
                                           "--optim is ignored; default: none, so --optim decides")
    optim: Optional[str] = field(None, "a transformers optimizer by name (adamw_torch, adamw_torch_fused, "
                                       "adamw_bnb_8bit, adafactor, ...), used when --optimizer is not set; "
                                       "default adamw_torch_fused on CUDA, adamw_torch elsewhere")
    loss_type: Optional[str] = field(None, "registered loss plugin; unset: token cross-entropy. With --task_type "
                                           "(unset: the first named): embedding infonce, cosine_similarity, "
                                           "contrastive; reranker listwise_reranker, reranker (pointwise); "
                                           "generative_reranker listwise_generative_reranker, generative_reranker")
    eval_metric: Optional[str] = field(None, "registered metric plugin; default token accuracy")
    callbacks: list[str] = field(default_factory=list, help="registered callback plugins")
    logging_steps: int = field(5, "log every N steps")
    eval_steps: Optional[int] = field(None, "evaluate every N steps (default: save_steps)")
    save_steps: int = field(500, "checkpoint every N steps")
    save_total_limit: Optional[int] = field(2, "keep the last N checkpoints")
    save_only_model: bool = field(False, "skip optimizer state in checkpoints (no exact resume)")
    seed: int = field(42, "random seed")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass to save memory")
    gradient_checkpointing_every: int = field(
        1, "with --gradient_checkpointing: recompute only every k-th decoder layer (1: all; 2: half of them, "
           "less recompute for more memory)")
    activation_offloading: bool = field(
        False, "keep the activations saved for the backward pass in pinned host memory (copied on a stream of their "
               "own) instead of on the GPU; weights stay. Trades PCIe traffic for activation memory; combines with "
               "--gradient_checkpointing")
    packing: bool = field(False, "pack several rows into one sequence (no cross-row attention)")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 help="tensorboard, wandb, swanlab, none")
    resume_from_checkpoint: Optional[str] = field(None, "checkpoint folder, or 'last' for the newest one in output_dir")
    dataloader_num_workers: int = field(0, "data loader worker processes")
    use_liger_kernel: bool = field(False, "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused cross-entropy); "
                                          "needs a CUDA GPU and pip install 'lmforge[liger]'")
    fused_ce: Literal["auto", "true", "false"] = field(
        "auto", "loss from the last hidden states chunk by chunk, never the full logits; auto: on CUDA where it applies")
    varlen_attention: Literal["auto", "true", "false"] = field(
        "auto", "with --packing: variable-length attention kernels instead of a block-diagonal mask; auto: on CUDA")
    lean_layers: Literal["auto", "true", "false"] = field(
        "auto", "RMSNorm and SwiGLU that keep fewer activations for backward; auto: on CUDA without Liger")
    lean_lora: bool = field(True, "LoRA layers cast their small adapter weights to the activations' dtype (not "
                                  "their input to float32) and add the adapter's output inside its GEMM; false: "
                                  "peft's own forward")
    torch_compile: bool = field(False, "compile the model with torch.compile (transformers' torch_compile)")
    create_checkpoint_symlink: bool = field(False, "also link output_dir/last to the last checkpoint")
    plot: bool = field(True, "write PNG plots of loss and learning rate at the end")
    use_cpu: bool = field(False, "train on the CPU even if a GPU is there")
    dry_run: bool = field(False, "check the flags, encode a sample of the data and print what the run would do "
                                 "(lengths, truncation, labelled share, trainable parameters, steps, peak GPU memory "
                                 "per device); train nothing")

    @property
    def is_adapter(self) -> bool:
        return self.train_type in ("lora", "dora", "qlora")


def switch(value: Union[str, bool, None]) -> Optional[bool]:
    """An ``auto|true|false`` flag as True, False or None (auto); bools pass through (Python callers)."""
    if value is None or isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low == "auto":
        return None
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected auto, true or false, got {value!r}")


@dataclass
class PtArguments(TrainArguments):
    """Continued pre-training on raw text: lmforge pt --model M --dataset D (text column)."""

    loss_scale: str = field("all", "which tokens carry loss (pt trains on every token)")
    truncation_strategy: Literal["left", "right", "delete", "raise"] = field(
        "right", "what to do with a text longer than max_length")
