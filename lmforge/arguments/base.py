"""Dataclass arguments <-> command-line flags, config files and ``args.json``.

Why not ``transformers.HfArgumentParser``: importing transformers costs seconds (``--help`` must
stay fast), and we want an unknown or misspelt flag to fail before any work starts with the
closest valid flag suggested, list values space-separated and dict values as JSON strings.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin

A = TypeVar("A")


class ArgumentError(ValueError):
    """A flag or config value that cannot be used; the message names it."""


def field(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
          choices: Sequence[Any] | None = None, hidden: bool = False) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    meta = {"help": help, "choices": choices, "hidden": hidden}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return args, True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_dict(text: Any) -> dict:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON object such as '{{\"key\": 1}}', got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _scalar_converter(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is dict or get_origin(tp) is dict:
        return _parse_dict
    if get_origin(tp) is Literal:
        return str
    if isinstance(tp, list):  # a union such as int | str: try each in order
        convs = [_scalar_converter(t) for t in tp]

        def conv(text):
            for c in convs:
                try:
                    return c(text)
                except (TypeError, ValueError):
                    pass
            raise ValueError(f"cannot parse {text!r}")

        return conv
    return str


def _field_spec(tp: Any) -> tuple[Any, bool, list | None]:
    """(converter, is_list, literal choices) for a resolved type hint."""
    tp, _ = _strip_optional(tp)
    if get_origin(tp) in (list, tuple, Sequence):
        inner = get_args(tp)[0] if get_args(tp) else str
        inner, _ = _strip_optional(inner)
        return _scalar_converter(inner), True, list(get_args(inner)) if get_origin(inner) is Literal else None
    choices = list(get_args(tp)) if get_origin(tp) is Literal else None
    return _scalar_converter(tp), False, choices


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(cls: type, name: str, value: Any, source: str) -> Any:
    """Convert and validate one value for field ``name``; errors name the flag and the source."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    conv, is_list, choices = _field_spec(_hints(cls)[name])
    choices = f.metadata.get("choices") or choices
    _, optional = _strip_optional(_hints(cls)[name])
    try:
        if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [value]
            out = [conv(v) if isinstance(v, str) or conv in (_parse_dict,) else v for v in items]
        else:
            out = conv(value) if isinstance(value, str) or conv is _parse_dict else value
            if conv is float and isinstance(out, int) and not isinstance(out, bool):
                out = float(out)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{source}: bad value for --{name}: {e}") from None
    if choices:
        for v in out if is_list else [out]:
            if v not in choices:
                close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ArgumentError(f"{source}: --{name} must be one of {', '.join(map(str, choices))}; "
                                    f"got {v!r}.{hint}")
    return out


def suggest_flag(flag: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(flag.lstrip("-"), [v.lstrip("-") for v in valid], n=1, cutoff=0.6)
    return f" Did you mean --{close[0]}?" if close else ""


_TYPE_NAMES = {int: "INT", float: "FLOAT", str: "STR", dict: "JSON"}
_DESCRIBES_DEFAULT = re.compile(r"(?<!['\"])\bdefaults?\b(?!['\"])", re.IGNORECASE)  # not the quoted value 'default'


def _metavar(tp: Any, choices: Sequence[Any] | None) -> str:
    """What ``--help`` shows after a flag: its choices, or the type of value it takes."""
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    tp, _ = _strip_optional(tp)
    if get_origin(tp) in (list, tuple, Sequence):
        tp, _ = _strip_optional(get_args(tp)[0] if get_args(tp) else str)
    if tp is bool:
        return "{true,false}"
    if isinstance(tp, list):  # a union such as int | str
        return "|".join(_metavar(t, None) for t in tp)
    return _TYPE_NAMES.get(get_origin(tp) or tp, "STR")


def _show_default(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None or value == [] or value == {}:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


class _Formatter(argparse.HelpFormatter):
    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == "?" and action.const == "true":  # a bool flag: `--json` alone means true
            return self._metavar_formatter(action, default_metavar)(1)[0]
        return super()._format_args(action, default_metavar)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # exit code 2 as argparse does; a short usage line
        self.exit(2, f"usage: {self.prog} [flags]  (see {self.prog} --help)\n{self.prog}: error: {message}\n")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, usage="%(prog)s [flags]",
                     formatter_class=_Formatter)
    parser.add_argument("--config", metavar="FILE", help="a YAML or JSON file of arguments; flags override it")
    if accepts_presets(cls):
        parser.add_argument("--preset", nargs="+", metavar="NAME",
                            help="named sets of flags (lmforge presets lists them; later ones, --config and flags "
                                 "override earlier ones)")
    hints = _hints(cls)
    # One help section per argument group (ModelArguments, DataArguments, ...), in a stable order.
    owner: dict[str, type] = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            owner[name] = klass
    groups: dict[type, argparse._ArgumentGroup] = {}
    def rank(f: dataclasses.Field) -> int:  # base groups in declaration order, the command's own flags last
        klass = owner.get(f.name, cls)
        return len(cls.__mro__) if klass is cls else cls.__mro__.index(klass)

    fields = sorted(dataclasses.fields(cls), key=rank)
    for f in fields:
        if not f.init or f.metadata.get("hidden"):
            continue
        klass = owner.get(f.name, cls)
        if klass not in groups:
            title = klass.__name__.replace("Arguments", "").lower() or "arguments"
            groups[klass] = parser.add_argument_group(title, (klass.__doc__ or "").strip().split("\n")[0])
        _, is_list, choices = _field_spec(hints[f.name])
        choices = f.metadata.get("choices") or choices
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if not _DESCRIBES_DEFAULT.search(help_text):  # a computed default is described in the help text itself
            help_text += f" (default: {_show_default(default)})"
        # Values stay strings here; conversion happens in _convert so errors name the flag our way.
        # A bool flag alone means true (`--json`); `--json false` still works.
        is_bool = _strip_optional(hints[f.name])[0] is bool and not is_list
        groups[klass].add_argument(f"--{f.name}", nargs="+" if is_list else "?" if is_bool else None,
                                   const="true" if is_bool else None, default=argparse.SUPPRESS,
                                   help=help_text.replace("%", "%%"), metavar=_metavar(hints[f.name], choices))
    return parser


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"--config: no such file {path!r}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is reported with the file name
        raise ArgumentError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of argument names to values")
    return data


def convert_values(cls: type, values: dict, source: str = "arguments", *, ignore_unknown: bool = False) -> dict:
    """Each value of a mapping converted and validated for its field of ``cls`` (no cross-field checks)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            if ignore_unknown:
                continue
            raise ArgumentError(f"{source}: unknown argument {k!r}.{suggest_flag(k, sorted(names))}")
        kwargs[k] = _convert(cls, k, v, source)
    return kwargs


def from_dict(cls: type[A], values: dict, source: str = "arguments", *, ignore_unknown: bool = False) -> A:
    """Build ``cls`` from a mapping, converting and validating each value."""
    kwargs = convert_values(cls, values, source, ignore_unknown=ignore_unknown)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ArgumentError(f"{source}: {e}") from None


def parse_args(cls: type[A], argv: list[str] | None = None, prog: str = "lmforge") -> A:
    """Parse flags (and ``--config``) into ``cls``; exit 2 with a clear message on a bad flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog, (cls.__doc__ or "").strip().split("\n")[0])
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        valid = [a for act in parser._actions for a in act.option_strings]
        parser.error(f"unrecognized argument {flag!r}.{suggest_flag(flag.split('=')[0], valid)}")
    values: dict[str, Any] = {}
    try:
        config = load_config_file(ns.config) if getattr(ns, "config", None) else {}
        config_presets = config.pop("preset", None) if accepts_presets(cls) else None  # a config may name presets
        presets = getattr(ns, "preset", None) or config_presets
        if presets and accepts_presets(cls):
            from lmforge.presets import preset_values

            values.update(preset_values([presets] if isinstance(presets, str) else list(presets), cls))
        values.update(config)
        values.update({k: v for k, v in vars(ns).items() if k not in ("config", "preset")})
        source = " + ".join([*(["--preset"] if presets else []), *([f"--config {ns.config}"] if getattr(ns, "config", None) else []), "flags"])
        return from_dict(cls, values, source)
    except ArgumentError as e:
        parser.error(str(e))


def accepts_presets(cls: type) -> bool:
    """Training commands (the classes with a ``train_type``) take ``--preset``."""
    return any(f.name == "train_type" for f in dataclasses.fields(cls))


def to_dict(args: Any) -> dict:
    """JSON-safe dict of a dataclass's init fields."""
    out = {}
    for f in dataclasses.fields(args):
        if f.init:
            v = getattr(args, f.name)
            out[f.name] = v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)
    return out


def save_args(args: Any, output_dir: str | Path, name: str = "args.json") -> Path:
    """``args.json`` (readable by others, like the weights beside it), without the values of secret flags."""
    from lmforge.utils.command import is_secret
    from lmforge.utils.io import atomic_write_text

    # Never written: checkpoints (and their args.json) get copied, shared and pushed to hubs.
    values = {k: (None if is_secret(k) else v) for k, v in to_dict(args).items()}
    path = Path(output_dir) / name
    atomic_write_text(path, json.dumps(values, indent=2, ensure_ascii=False))
    return path


def read_args_json(ckpt_dir: str | Path) -> dict:
    """The ``args.json`` written by training, looked up in the checkpoint or its parent folder."""
    for d in (Path(ckpt_dir), Path(ckpt_dir).parent):
        p = d / "args.json"
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    return {}
