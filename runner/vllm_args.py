"""`vllm serve`'s own grammar: a pasted command read by vLLM's argument parser, built the way vLLM's own
tests build it (`FlexibleArgumentParser` with the serve subcommand), whenever vLLM is importable.

Importing vLLM's parser takes seconds (it loads torch), so it happens on the first parse only, never at
import time of this module.
"""

from __future__ import annotations

import argparse
import functools
import re
import threading
from collections.abc import Collection
from typing import Any, NoReturn

_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
_LOCK = threading.Lock()  # argparse parsers keep state while parsing; the dashboard serves several sessions


class VllmRefused(ValueError):
    """vLLM's parser refused the arguments; the message is vLLM's."""


def _raise(message: str) -> NoReturn:
    raise VllmRefused(message)


@functools.cache
def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser] | None:
    """(vLLM's top-level parser, its `serve` subparser), or None when vLLM is not importable."""
    try:
        from vllm.entrypoints.cli.serve import cmd_init
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        return None
    top = FlexibleArgumentParser(prog="vllm")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    (serve,) = [cmd.subparser_init(subparsers) for cmd in cmd_init() if cmd.name == "serve"]
    for parser in (top, serve):  # argparse prints and exits on a refusal; we want the message
        parser.error = _raise  # type: ignore[method-assign]
    return top, serve


def _option_like(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and not _NUMBER.match(arg)


def _action(serve: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The action of an option as vLLM spells it (`--max_num_seqs` is `--max-num-seqs`), prefixes included."""
    if name.startswith("--"):
        head, dot, _ = name[2:].partition(".")
        if dot:  # `--compilation-config.level 3`: a key inside a JSON argument
            return None
        name = "--" + head.replace("_", "-")
    actions = serve._option_string_actions
    if name in actions:
        return actions[name]
    if name.startswith("--") and serve.allow_abbrev:
        found = {actions[o] for o in actions if o.startswith(name)}
        if len(found) == 1:
            return found.pop()
    return None


def _groups(serve: argparse.ArgumentParser, tokens: list[str]) -> list[tuple[argparse.Action | None, list[str]]]:
    """The tokens cut into (action, its tokens) in order; positionals have action None."""
    out: list[tuple[argparse.Action | None, list[str]]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not _option_like(tok):
            out.append((None, [tok]))
            i += 1
            continue
        name, eq, _ = tok.partition("=")
        action = _action(serve, name)
        nargs = action.nargs if action is not None else None
        end = i + 1
        if not eq:
            if nargs is None or nargs == "?":
                if end < len(tokens) and not _option_like(tokens[end]):
                    end += 1
            elif isinstance(nargs, int):
                end += nargs
            elif nargs in ("*", "+"):
                while end < len(tokens) and not _option_like(tokens[end]):
                    end += 1
            elif nargs == argparse.REMAINDER:
                end = len(tokens)
        out.append((action, tokens[i:end]))
        i = end
    return out


def parse_serve(tokens: list[str], fields: Collection[str]) -> tuple[dict[str, Any], list[str]] | None:
    """Read the arguments of `vllm serve` (after `serve`) with vLLM's own parser.

    Returns the values vLLM parsed for the given `fields` (its dest names; the model as `model`), and
    every other argument verbatim and in order; None when vLLM is not importable. Raises `VllmRefused`
    with vLLM's message for a command vLLM would refuse.
    """
    parsers = serve_parser()
    if parsers is None:
        return None
    top, serve = parsers
    groups = _groups(serve, tokens)
    # `--config FILE` would make the parser read a file on this machine: pass it through, unread
    checked = [t for action, toks in groups if not (action is not None and action.dest == "config") for t in toks]
    with _LOCK:
        try:
            ns = top.parse_args(["serve", *checked])
        except SystemExit:  # --help and the like
            raise VllmRefused("the command asks vLLM for help instead of serving; remove --help") from None
    values: dict[str, Any] = {}
    extra: list[str] = []
    positionals = 0
    for action, toks in groups:
        if action is None:
            positionals += 1
            if positionals == 1:
                values["model"] = ns.model_tag
                continue
            extra += toks
        elif action.dest == "model":  # vLLM moves `--model X` to the positional model
            values["model"] = ns.model_tag
        elif action.dest in fields:
            values[action.dest] = getattr(ns, action.dest)
        else:
            extra += toks
    if values.get("model") is None:
        values.pop("model", None)
    return values, extra
