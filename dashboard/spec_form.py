"""A form generated from the pydantic specs: one widget per field, named as vLLM's flag, with the
field's description as help. Widget values live in `st.session_state` under `<prefix>.<field>`.

The value conversions (`field_kind`, `to_widget`, `from_widget`) are pure and tested on their own.
"""

from __future__ import annotations

import math
import shlex
import types
from collections.abc import Callable, MutableMapping
from typing import Any, Literal, Union, get_args, get_origin

import streamlit as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.errors import Problem

Kind = Literal["bool", "choice", "int", "text", "list", "dict"]
Widget = Callable[[str, str, str], None]  # (state key, label, help) -> draws the widget

FormState = MutableMapping[Any, Any]  # st.session_state (its keys may be str or int), a dict in tests


def _parts(info: FieldInfo) -> tuple[Any, bool]:
    """The annotation without `None`, and whether None is allowed."""
    ann = info.annotation
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return (args[0] if len(args) == 1 else ann), len(args) < len(get_args(ann))
    return ann, False


def field_kind(info: FieldInfo) -> Kind:
    base, optional = _parts(info)
    if base is bool:
        return "bool"
    if get_origin(base) is Literal:
        return "choice"
    if base is int and not optional:
        return "int"
    if get_origin(base) is list:
        return "list"
    if get_origin(base) is dict:
        return "dict"
    return "text"


def flag_label(name: str) -> str:
    return name.replace("_", "-")


def default_of(info: FieldInfo) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)


def to_widget(value: Any, kind: Kind) -> Any:
    """A spec value as its widget holds it."""
    if kind in ("bool", "choice", "int"):
        return value
    if kind == "list":
        return shlex.join(value or [])
    if kind == "dict":
        return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (value or {}).items())
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def from_widget(value: Any, kind: Kind, info: FieldInfo) -> Any:
    """A widget value as the spec takes it (pydantic does the typing); ValueError says what is wrong."""
    if kind in ("bool", "choice", "int"):
        return value
    text = (value or "").strip()
    if kind in ("list", "dict"):
        try:
            items = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot split {text!r} ({exc}); check its quotes") from None
        if kind == "list":
            return items
        out = {}
        for item in items:
            name, eq, val = item.partition("=")
            if not eq or not name:
                raise ValueError(f"{item!r} is not NAME=value; write e.g. VLLM_LOGGING_LEVEL=DEBUG")
            out[name] = val
        return out
    if text == "" and _parts(info)[1]:
        return None
    return text


def load(spec: BaseModel, prefix: str, state: FormState, only_missing: bool = False) -> None:
    """Put `spec`'s values into the widgets under `prefix` (all of them, or only those not set yet)."""
    for name, info in type(spec).model_fields.items():
        key = f"{prefix}.{name}"
        if only_missing and key in state:
            continue
        state[key] = to_widget(getattr(spec, name), field_kind(info))


def collect(model: type[BaseModel], prefix: str, state: FormState) -> tuple[dict[str, Any], list[Problem]]:
    """The widget values under `prefix` as spec input, and the conversion problems (named by form key)."""
    data: dict[str, Any] = {}
    problems: list[Problem] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}"
        if key not in state:
            continue
        try:
            data[name] = from_widget(state[key], field_kind(info), info)
        except ValueError as exc:
            problems.append(Problem(f"{flag_label(name)}: {exc}.", key))
    return data, problems


def render(model: type[BaseModel], prefix: str, names: list[str], columns: int = 3,
           custom: dict[str, Widget] | None = None, wide: tuple[str, ...] = ("model",),
           errors: dict[str, list[str]] | None = None) -> None:
    """Draw the widgets of `names` row by row in a grid; list/dict fields and `wide` ones take a whole row;
    `custom` replaces the generated widget of a field; `errors` (form key → messages) shows under each field."""
    custom, errors = custom or {}, errors or {}
    row: list[str] = []

    def draw(name: str) -> None:
        _widget(model, prefix, name, custom)
        for message in errors.get(f"{prefix}.{name}", []):
            st.error(message, icon=":material/error:")

    def flush() -> None:
        for cell, name in zip(st.columns(columns), row):
            with cell:
                draw(name)
        row.clear()

    for name in names:
        if name in wide or field_kind(model.model_fields[name]) in ("list", "dict"):
            flush()
            draw(name)
            continue
        row.append(name)
        if len(row) == columns:
            flush()
    flush()


def _widget(model: type[BaseModel], prefix: str, name: str, custom: dict[str, Widget]) -> None:
    info = model.model_fields[name]
    key, label, help_ = f"{prefix}.{name}", flag_label(name), info.description or ""
    if name in custom:
        custom[name](key, label, help_)
        return
    kind = field_kind(info)
    if kind == "bool":
        st.checkbox(label, key=key, help=help_)
    elif kind == "choice":
        st.selectbox(label, get_args(_parts(info)[0]), key=key, help=help_)
    elif kind == "int":  # no widget bounds: the spec says what is out of range, in words, beside the field
        st.number_input(label, step=1, key=key, help=help_)
    else:
        placeholder = {"list": "--flag value …", "dict": "NAME=value …"}.get(kind, "unset" if _parts(info)[1] else "")
        st.text_input(label, key=key, help=help_, placeholder=placeholder)
