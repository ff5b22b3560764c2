"""Forms generated from the argument dataclasses: the page and the terminal share flags, defaults and help.

``flags_of(TrainArguments)`` lists every flag ``lmforge sft --help`` shows, in its sections and with
its help text; ``build_form`` turns each into a component its type calls for (a checkbox for a bool,
a dropdown for a choice, a number, a text box: lists are space-separated and dicts JSON, as on the
command line). A form's values become the flags of the command line (only those that differ from
the default), and ``parse_flags`` checks them with the same conversion and checks ``lmforge
<command>`` runs, so a flag added to a dataclass appears in the page, and is validated there,
without UI code. Secret flags (keys, tokens) never reach the command line: ``split_secrets`` keeps
them apart for a private config file.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

from lmforge.arguments.base import ArgumentError, _field_spec, _hints, _parse_bool, _parse_dict, build_parser, from_dict
from lmforge.utils.command import is_secret

NONE = "none"  # the value an optional choice shows when unset (the command line's spelling of None)
SWITCH = ("default", "true", "false")  # an optional bool: unset (the command's own default), on, off


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of a command, as its dataclass field describes it."""

    name: str
    group: str  # the --help section (model, data, template, tuner, train, ...)
    help: str  # as --help shows it, with the default
    default: Any
    kind: str  # bool, switch, int, float, choice, text, list, dict
    choices: tuple | None = None
    optional: bool = False

    @property
    def secret(self) -> bool:
        return is_secret(self.name)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(hint: Any, meta_choices: Any) -> tuple[str, tuple | None, bool]:
    from lmforge.arguments.base import _strip_optional

    conv, is_list, choices = _field_spec(hint)
    _, optional = _strip_optional(hint)
    choices = tuple(meta_choices or choices or ()) or None
    if is_list:
        return "list", choices, optional
    if choices:
        return "choice", choices, optional
    if conv is _parse_bool:
        return ("switch" if optional else "bool"), None, optional
    if conv is _parse_dict:
        return "dict", None, optional
    if conv in (int, float):
        return conv.__name__, None, optional
    return "text", None, optional


def flags_of(cls: type) -> list[Flag]:
    """Every flag of ``cls`` that ``--help`` lists, in its order and sections."""
    parser = build_parser(cls, "lmforge")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    out = []
    for group in parser._action_groups:
        for action in group._group_actions:
            name = action.dest
            if name not in fields:  # --config, --help
                continue
            f = fields[name]
            kind, choices, optional = _kind(hints[name], f.metadata.get("choices"))
            out.append(Flag(name, group.title or "", (action.help or "").replace("%%", "%"), _default(f), kind,
                            choices, optional))
    return out


# ------------------------------------------------------------------------------------------- values


def from_widget(flag: Flag, value: Any) -> Any:
    """A component's value as the dataclass holds it (errors name the flag)."""
    try:
        if flag.kind == "bool":
            return bool(value)
        if flag.kind == "switch":
            return None if value in (None, "", SWITCH[0]) else _parse_bool(str(value))
        if flag.kind in ("int", "float"):
            if value is None or (isinstance(value, str) and not value.strip()):
                if flag.optional:
                    return None
                raise ValueError("a number is required")
            number = float(value)
            if flag.kind == "int":
                if not number.is_integer():
                    raise ValueError(f"expected a whole number, got {value}")
                return int(number)
            return number
        if flag.kind == "choice":
            return None if value in (None, "", NONE) and flag.optional else value
        if flag.kind == "list":
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            return shlex.split(str(value or ""))
        if flag.kind == "dict":
            if isinstance(value, dict):
                return value
            return _parse_dict(value) if str(value or "").strip() else {}
        text = "" if value is None else str(value).strip()
        return None if not text and (flag.optional or flag.default is None) else text
    except ValueError as e:
        raise ArgumentError(f"--{flag.name}: {e}") from None


def to_widget(flag: Flag, value: Any) -> Any:
    """What a component shows for the dataclass value ``value``."""
    if flag.kind == "switch":
        return SWITCH[0] if value is None else ("true" if value else "false")
    if flag.kind == "choice":
        return NONE if value is None else value
    if flag.kind == "list":
        return " ".join(shlex.quote(str(v)) for v in value or [])
    if flag.kind == "dict":
        return json.dumps(value) if value else ""
    if flag.kind == "text" or (flag.kind in ("int", "float") and flag.optional):
        return "" if value is None else str(value)
    return value


def _flag_text(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if value is None:
        return [NONE]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, float):
        return [repr(value)]
    return [str(value)]


def to_argv(flags: list[Flag], values: dict[str, Any]) -> list[str]:
    """``--name value ...`` for each value that differs from its flag's default (a dataclass value each)."""
    argv: list[str] = []
    for flag in flags:
        if flag.name not in values:
            continue
        value = values[flag.name]
        if value == flag.default or (flag.kind == "list" and not value):  # an empty list has no spelling
            continue
        argv += [f"--{flag.name}", *_flag_text(value)]
    return argv


def split_secrets(flags: list[Flag], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values for the command line, secret values set) — secrets go to a private config file instead."""
    secret = {f.name for f in flags if f.secret}
    public = {k: v for k, v in values.items() if k not in secret}
    hidden = {k: v for k, v in values.items() if k in secret and v}
    return public, hidden


def command_line(command: str, argv: list[str], secrets: dict[str, Any] | None = None) -> str:
    """``lmforge <command> <argv>`` as a person would type it, secrets shown as ``<hidden>``."""
    hidden = [part for name in (secrets or {}) for part in (f"--{name}", "<hidden>")]
    return "lmforge " + shlex.join([command, *argv, *hidden])


def parse_flags(cls: type, argv: list[str], secrets: dict[str, Any] | None = None) -> Any:
    """``argv`` (and ``secrets``) parsed into ``cls`` exactly as ``lmforge <command>`` would, raising
    :class:`ArgumentError` with the CLI's message instead of exiting."""
    parser = build_parser(cls, "lmforge")
    try:
        ns, unknown = parser.parse_known_args(argv)
    except SystemExit:
        raise ArgumentError(f"cannot parse the flags {shlex.join(argv)}") from None
    if unknown:
        raise ArgumentError(f"unrecognized argument {unknown[0]!r}")
    flags = {k: v for k, v in vars(ns).items() if k not in ("config", "preset")}  # the form has neither
    return from_dict(cls, {**(secrets or {}), **flags}, "flags")


def form_values(flags: list[Flag], widget_values: list[Any]) -> dict[str, Any]:
    """The dataclass values of a form's components (in ``flags`` order)."""
    return {flag.name: from_widget(flag, v) for flag, v in zip(flags, widget_values)}


# -------------------------------------------------------------------------------------------- gradio


def _component(gr: Any, flag: Flag, prefix: str, value: Any, choices: list[str] | None) -> Any:
    common = dict(label=flag.name, info=flag.help, elem_id=f"{prefix}-{flag.name}")
    shown = to_widget(flag, value)
    if flag.kind == "bool":
        return gr.Checkbox(value=shown, **common)
    if flag.kind == "switch":
        return gr.Dropdown(list(SWITCH), value=shown, **common)
    if flag.kind in ("int", "float") and not flag.optional:
        return gr.Number(value=shown, precision=0 if flag.kind == "int" else None, **common)
    if flag.kind in ("int", "float"):  # a number box cannot be left empty, and empty means "the default" here
        return gr.Textbox(value=shown, placeholder="default", **common)
    if flag.kind == "choice":
        return gr.Dropdown([*([NONE] if flag.optional else []), *map(str, flag.choices)], value=shown, **common)
    if choices is not None and flag.kind == "list":
        return gr.Dropdown(choices, value=list(value or []), multiselect=True, allow_custom_value=True, **common)
    if choices is not None and flag.kind == "text":
        return gr.Dropdown(choices, value=shown or None, allow_custom_value=True, **common)
    if flag.kind == "dict":
        return gr.Textbox(value=shown, placeholder='{"key": 1}', **common)
    return gr.Textbox(value=shown, type="password" if flag.secret else "text", **common)


def build_form(gr: Any, flags: list[Flag], *, prefix: str, main: list[str],
               choices: dict[str, list[str]] | None = None, skip: set[str] = frozenset(),
               per_row: int = 3) -> tuple[list[Flag], list[Any]]:
    """Components for ``flags`` inside the current gradio layout: the ``main`` ones first, the rest folded
    into one accordion per ``--help`` section (``choices``: suggestions for a text or list flag). Returns the
    flags shown and their components, in step."""
    choices = choices or {}
    by_name = {f.name: f for f in flags if f.name not in skip}
    shown: list[Flag] = []
    components: list[Any] = []

    def rows(group: list[Flag]) -> None:
        for i in range(0, len(group), per_row):
            with gr.Row():
                for flag in group[i:i + per_row]:
                    components.append(_component(gr, flag, prefix, flag.default, choices.get(flag.name)))
                    shown.append(flag)

    rows([by_name[n] for n in main if n in by_name])
    sections: dict[str, list[Flag]] = {}
    for flag in by_name.values():
        if flag.name not in main:
            sections.setdefault(flag.group, []).append(flag)
    for title, group in sections.items():
        with gr.Accordion(f"{title} ({len(group)} more flags)", open=False):
            rows(group)
    return shown, components
