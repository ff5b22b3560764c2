"""Which parameters train: LoRA, DoRA, QLoRA (through peft), full, freeze; more via the TUNERS registry."""
from lmforge.tuners.prepare import prepare_model, trainable_summary

__all__ = ["prepare_model", "trainable_summary"]
