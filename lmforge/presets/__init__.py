"""Training presets: named sets of flags for ``pt``/``sft``/``rlhf`` (``--preset NAME [NAME ...]``).

A preset is a YAML file with a one-line ``description``, the ``commands`` it applies to and its
``args`` (flag names and values, as in a ``--config`` file). Several presets apply in order (later
ones win: ``--preset full fsdp``); then ``--config``, then the flags on the command line. Presets are
looked up in the folders of ``$LMFORGE_PRESETS`` (``os.pathsep``-separated; a user's file wins over a
shipped one of the same name), then here; a path to a ``.yaml`` file works too.

This module sits at the arguments layer (``arguments/base.py`` reads presets while parsing flags)
and imports nothing but PyYAML and that module.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from lmforge.arguments.base import ArgumentError

SHIPPED_DIR = Path(__file__).parent
# the argument class of each training command (presets name commands; the parser knows classes)
COMMAND_OF_CLASS = {"TrainArguments": "sft", "PtArguments": "pt", "RlhfArguments": "rlhf",
                    "PreferenceArguments": "rlhf"}
_KEYS = {"description", "commands", "args"}


class PresetError(ArgumentError):
    """A preset that cannot be found or used; the message names it and its file."""


def preset_dirs() -> list[Path]:
    user = [Path(p).expanduser() for p in os.environ.get("LMFORGE_PRESETS", "").split(os.pathsep) if p.strip()]
    return [*user, SHIPPED_DIR]


def _files() -> dict[str, Path]:
    """name -> file, the first folder of :func:`preset_dirs` that has it winning."""
    out: dict[str, Path] = {}
    for d in preset_dirs():
        if not d.is_dir():
            continue
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            out.setdefault(f.stem, f)
    return out


def find_preset(name: str) -> Path:
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise PresetError(f"--preset {name}: no such file")
        return p
    files = _files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PresetError(f"--preset {name}: unknown preset.{hint} Known: {', '.join(sorted(files))} "
                          "(lmforge presets lists them; $LMFORGE_PRESETS adds folders)")
    return files[name]


def read_preset(path: Path) -> dict[str, Any]:
    """The preset file as ``{"name", "description", "commands", "args", "path"}``; its shape checked."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PresetError(f"preset {path}: cannot read it: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
        raise PresetError(f"preset {path}: expected a mapping with 'description', 'commands' and 'args' (a mapping "
                          "of flag names to values)")
    unknown = set(data) - _KEYS
    if unknown:
        raise PresetError(f"preset {path}: unknown key(s) {sorted(unknown)}; a preset has {sorted(_KEYS)} (flags go "
                          "under 'args')")
    commands = data.get("commands") or list(COMMAND_OF_CLASS.values())
    commands = [commands] if isinstance(commands, str) else list(commands)
    return {"name": path.stem, "description": str(data.get("description") or "").strip(), "commands": commands,
            "args": dict(data["args"]), "path": str(path)}


def preset_values(names: list[str], cls: type) -> dict[str, Any]:
    """The merged ``args`` of ``names`` for the command of ``cls``; every value is checked on its own (the
    whole set is checked once flags are added) so an unknown flag or a bad value fails naming the file."""
    from lmforge.arguments.base import convert_values

    command = COMMAND_OF_CLASS.get(cls.__name__)
    merged: dict[str, Any] = {}
    for name in names:
        preset = read_preset(find_preset(name))
        if command and command not in preset["commands"]:
            raise PresetError(f"--preset {name} is for lmforge {'/'.join(preset['commands'])}, not lmforge {command}")
        try:
            convert_values(cls, preset["args"], f"--preset {name} ({preset['path']})")
        except ArgumentError as e:
            raise PresetError(str(e)) from None
        merged.update(preset["args"])
    return merged


def list_presets() -> list[dict[str, Any]]:
    return [read_preset(path) for _, path in sorted(_files().items())]


def presets_main(args: Any) -> dict[str, Any]:
    """``lmforge presets``: each preset with its commands and one-line purpose."""
    presets = list_presets()
    if args.json:
        print(json.dumps(presets, indent=2))
    else:
        width = max((len(p["name"]) for p in presets), default=8) + 2
        for p in presets:
            user = "" if Path(p["path"]).parent == SHIPPED_DIR else f"  [{p['path']}]"
            print(f"{p['name']:<{width}}{'/'.join(p['commands']):<14}{p['description']}{user}")
        print("\nuse: lmforge sft --preset NAME [NAME ...] ... (later presets, --config and flags override earlier ones)")
    return {"presets": presets}
