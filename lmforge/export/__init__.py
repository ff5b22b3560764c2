"""Export: merge LoRA adapters into the base model (quantize and convert come later)."""
from lmforge.export.merge import merge_lora

__all__ = ["merge_lora"]
