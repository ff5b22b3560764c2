"""Export: merge LoRA adapters, quantise (bitsandbytes, torchao, FP8), convert to GGUF, push to a hub."""
from lmforge.export.merge import merge_lora

__all__ = ["merge_lora"]
