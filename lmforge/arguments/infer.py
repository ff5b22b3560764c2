"""Arguments of the generation commands (``infer``, ``deploy``) and ``export``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import field
from lmforge.arguments.model import DataArguments, ModelArguments, TemplateArguments
from lmforge.arguments.task import TaskArguments


@dataclass
class GenerationArguments:
    """Default sampling settings (a request may override them)."""

    max_new_tokens: Optional[int] = field(512, "most tokens generated per reply")
    temperature: float = field(0.0, "0 = greedy")
    top_p: float = field(1.0, "nucleus sampling mass")
    top_k: int = field(-1, "sample from the k most likely tokens (-1: all)")
    repetition_penalty: float = field(1.0, "penalty on repeated tokens (1: none)")
    stop: list[str] = field(default_factory=list, help="stop strings: a reply ends before the first one")
    stream: bool = field(True, "stream tokens as they are generated (interactive chat)")
    keep_history: Optional[bool] = field(
        None, "chat: earlier turns stay in the conversation (default: true in a terminal; false when stdin is a "
              "pipe or file, so each message is answered on its own)")


@dataclass
class InferArguments(ModelArguments, DataArguments, TemplateArguments, GenerationArguments, TaskArguments):
    """Chat with a model, or answer a dataset: lmforge infer --model M [--val_dataset D]."""

    ckpt_dir: Optional[str] = field(None, "a training checkpoint; its args.json names the model, template and system")
    adapters: list[str] = field(default_factory=list, help="LoRA adapter folders (name=dir to name them)")
    infer_backend: Literal["hf", "native"] = field("hf", "generation engine: hf (any device) or native (CUDA)")
    max_batch_size: int = field(16, "requests generated together")
    data_parallel_size: int = field(1, "engine replicas, one per GPU (requests spread over them; one server in "
                                       "front of all with deploy)")
    result_path: Optional[str] = field(None, "output JSONL (default: <command>-<time>.jsonl in the checkpoint's "
                                                   "run folder, else in output/<model>/)")
    max_model_len: Optional[int] = field(None, "longest prompt + reply (default: the model's)")
    gpu_memory_utilization: float = field(0.9, "native: fraction of GPU memory for weights, activations and KV cache")
    max_num_seqs: int = field(256, "native: sequences decoded together (continuous batching)")
    max_num_batched_tokens: int = field(8192, "native: tokens per step; longer prompts are prefilled in chunks")
    block_size: int = field(16, "native: tokens per KV-cache block")
    enable_prefix_caching: bool = field(True, "native: share KV blocks of common prompt prefixes")
    enforce_eager: bool = field(False, "native: no CUDA graphs (debugging)")
    async_scheduling: bool = field(True, "native: launch each step before the previous step's tokens are read "
                                         "back, so the host's work overlaps the GPU's; false: one after the other")
    stream_interval: int = field(1, "native: a streamed reply gets a chunk every this many tokens (its first and "
                                    "last at once); more tokens per chunk cost a busy server less host time per "
                                    "token")
    prefill_wait_steps: int = field(0, "native: steps new prompts may wait while others decode, so several are "
                                       "prefilled in one step (a step with a prompt runs without CUDA graphs); "
                                       "0: at once. Costs at most that many steps of time to first token")
    seed: int = field(42, "random seed")


@dataclass
class DeployArguments(InferArguments):
    """OpenAI-compatible server: lmforge deploy --model M."""

    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(8000, "port to listen on")
    api_key: Optional[str] = field(None, "require 'Authorization: Bearer KEY'")
    api_key_file: Optional[str] = field(None, "file with one accepted key per line")
    served_model_name: Optional[str] = field(None, "model name in /v1/models (default: the model's folder name)")
    max_concurrency: Optional[int] = field(None, "requests generated at once (default: 8 for hf, max_num_seqs for "
                                                  "native)")
    max_queue: int = field(64, "requests waiting beyond max_concurrency before 429")
    log_file: Optional[str] = field(None, "also write the request log here")
    queue_timeout: float = field(600.0, "seconds a request may wait for a slot before 503 (0: no limit)")
    max_request_bytes: int = field(16 * 1024 * 1024, "largest request body accepted (413 beyond); prompts are "
                                                      "also bounded before tokenising: at most max_model_len x the "
                                                      "tokenizer's longest token in characters (400 beyond)")
    body_timeout: float = field(30.0, "seconds a client may take to send a request's headers, and again its body; "
                                      "a late body gets 408, late headers a closed connection (0: no limit)")
    max_connections: int = field(1024, "open client connections at most; one beyond gets 503 and is closed at once "
                                       "(an open connection costs a socket and a few KB of server memory)")
    metrics_public: bool = field(False, "serve /metrics without a key even when --api_key is set (/health is "
                                        "always open)")
    shutdown_timeout: float = field(30.0, "on SIGTERM/Ctrl-C, seconds running requests get to finish before "
                                          "they are cancelled")
    stream: bool = field(False, "unused by the server (clients ask for streaming per request)")
    engine_process: Optional[bool] = field(
        None, "run the engine in a process of its own: the engine's loop and the server's work per streamed token "
              "on two cores instead of one (a text model on the native engine streams token ids, the server builds "
              "the chunks). Default: on for `deploy --infer_backend native` on a GPU, off otherwise "
              "(--data_parallel_size > 1 always does)")
    allow_local_media: bool = field(False, "let requests name image files on this machine (path or file://); "
                                           "off: only base64 data: URLs are accepted")
    api_server_count: int = field(1, "HTTP processes serving the port, in front of the engine process: each "
                                     "streamed token's HTTP work spread over that many cores (implies "
                                     "--engine_process true); --max_concurrency and --max_queue are split "
                                     "between them, /metrics sums them all")


@dataclass
class ExportArguments(ModelArguments, TemplateArguments):
    """Merge LoRA adapters, quantise or convert to GGUF, push to a hub: lmforge export --ckpt_dir C ..."""

    ckpt_dir: Optional[str] = field(None, "a training checkpoint (adapter or full)")
    adapters: list[str] = field(default_factory=list, help="LoRA adapter folders to merge")
    merge_lora: bool = field(False, "merge the adapters into the base weights")
    output_dir: Optional[str] = field(None, "where the exported model goes (default: export-<checkpoint>-<time> in "
                                            "the checkpoint's run folder, with -<quant_method>-<type> when quantising)")
    safe_serialization: bool = field(True, "kept for compatibility: transformers 5 always writes safetensors")
    max_shard_size: str = field("5GB", "largest weight file")
    quant_method: Optional[Literal["gguf", "bnb", "fp8", "int4", "int8", "gptq", "awq"]] = field(
        None, "gguf: one file for llama.cpp/Ollama; bnb: bitsandbytes 4/8-bit; fp8: block-wise FP8 (GPU); "
              "int8/int4: torchao weight-only (int4 needs a GPU); gptq/awq: compressed-tensors W4A16/W8A16 "
              "for vLLM, calibrated on --dataset through llm-compressor. An adapter checkpoint is merged first")
    quant_type: Optional[Literal["f16", "bf16", "q8_0", "q4_k_m"]] = field(
        None, "gguf tensor type (default f16; q4_k_m is llama.cpp's 4-bit mix)")
    quant_bits: Optional[int] = field(None, "bnb: 4 (nf4, default) or 8; gptq/awq: 4 (W4A16, default) or 8 "
                                            "(W8A16), groups of 128")
    dataset: list[str] = field(default_factory=list,
                               help="gptq/awq calibration rows (files, hub ids or builtin:NAME; name#N sub-samples), "
                                    "rendered by the model's template and cut to --max_length")
    quant_n_samples: int = field(128, "gptq/awq: calibration rows used (the first N after a seeded shuffle)")
    push_to_hub: bool = field(False, "upload the result (or --ckpt_dir as it is) with a generated model card")
    hub_model_id: Optional[str] = field(None, "repository id for --push_to_hub (owner/name)")
    hub_token: Optional[str] = field(None, "hub token for --push_to_hub (default: the hub client's login)")
    hub_private_repo: bool = field(False, "create the --push_to_hub repository as private")
