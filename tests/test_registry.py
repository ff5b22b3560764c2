"""The one registry class and --external_plugins."""
from __future__ import annotations

import pytest

from lmforge.registry import TUNERS, Registry, load_plugins


def test_register_get_and_suggest():
    reg: Registry = Registry("widget")
    reg.register("alpha", 1)

    @reg.register("beta")
    def beta():
        return 2

    assert reg.get("alpha") == 1 and reg.get("beta")() == 2 and "alpha" in reg and len(reg) == 2
    with pytest.raises(KeyError, match="Did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(KeyError, match="already registered"):
        reg.register("alpha", 3)


def test_builtins_load_lazily():
    assert {"lora", "dora", "qlora", "full", "freeze"} <= set(TUNERS.names())


def test_external_plugin_registers(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from lmforge.registry import TUNERS\n"
        "@TUNERS.register('only_lm_head')\n"
        "def only_lm_head(model, args):\n"
        "    for n, p in model.named_parameters():\n"
        "        p.requires_grad_(n.startswith('lm_head') or 'embed_tokens' in n)\n"
        "    return model\n")
    load_plugins([str(plugin)])
    assert "only_lm_head" in TUNERS
    with pytest.raises(FileNotFoundError, match="external_plugins"):
        load_plugins([str(tmp_path / "missing.py")])
