"""A ``tokenizer_config.json`` that transformers 4 (and vLLM builds pinned to it) load, written over transformers 5's.

transformers 5 saves a tokenizer as ``tokenizer_class: TokenizersBackend`` (a class 4.x does not
have), lists extra special tokens under ``extra_special_tokens`` (4.x reads that key as a dict of
named tokens and fails on a list), and keeps the chat template only in ``chat_template.jinja``
(older 4.x read it from this file). The rewritten file keeps every key transformers 5 reads, so
both versions load the same tokenizer from one folder:

- ``tokenizer_class: PreTrainedTokenizerFast`` where 5 wrote ``TokenizersBackend`` (a model-specific
  class such as ``Qwen2Tokenizer`` exists in both and is kept);
- the special tokens as strings, ``additional_special_tokens`` as a list;
- ``added_tokens_decoder`` (id -> content and flags), which 4.x uses to rebuild added tokens;
- ``chat_template`` inline (``chat_template.jinja`` stays too).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _content(token: Any) -> str | None:
    if token is None or isinstance(token, str):
        return token
    return str(getattr(token, "content", token))


def v4_tokenizer_config(tokenizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (what transformers 5 wrote) made loadable by transformers 4 as well."""
    cfg = dict(saved)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)  # a transformers 5 loader switch; 4.x would pass it to __init__
    for key in ("is_local", "local_files_only"):  # load-time flags, not properties of the tokenizer
        cfg.pop(key, None)
    for key in _SPECIAL:
        value = _content(getattr(tokenizer, key, None))
        if value is not None:
            cfg[key] = value
    extra = cfg.pop("extra_special_tokens", None)
    names = [_content(t) for t in (extra if isinstance(extra, list) else [])]
    names += [_content(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []
              if not isinstance(getattr(tokenizer, "extra_special_tokens", None), dict)]
    if names:
        cfg["additional_special_tokens"] = list(dict.fromkeys(n for n in names if n))
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        cfg["chat_template"] = template
    cfg.setdefault("clean_up_tokenization_spaces", False)
    return cfg


def write_v4_tokenizer_config(folder: str | Path, tokenizer: Any) -> Path | None:
    """Rewrite ``folder/tokenizer_config.json`` (after ``tokenizer.save_pretrained(folder)``)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(v4_tokenizer_config(tokenizer, saved), indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path
