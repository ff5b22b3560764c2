"""Model and tokenizer loading: hub (Hugging Face, ModelScope), local folders and built-in models."""
from lmforge.model.builtin import builtin_model_dir, is_builtin
from lmforge.model.hub import ModelNotFoundError, resolve_model_dir
from lmforge.model.loader import default_device, get_model_tokenizer, load_tokenizer, resolve_dtype

__all__ = ["builtin_model_dir", "is_builtin", "ModelNotFoundError", "resolve_model_dir", "default_device",
           "get_model_tokenizer", "load_tokenizer", "resolve_dtype"]
