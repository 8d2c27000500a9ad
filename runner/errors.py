"""The one small exception hierarchy of servelab. Turned into `st.error` or a CLI exit at the edge only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self


class ServelabError(Exception):
    """Base of every error servelab raises on purpose."""


class Problem(str):
    """One thing wrong with a spec, in plain words, and the field it is about (`launch.model`,
    `bench.num_prompts`; None when it is about the whole spec), so a form can show it beside that field.
    It is the message itself for everyone else."""

    field: str | None

    def __new__(cls, message: str, field: str | None = None) -> Self:
        obj = super().__new__(cls, message)
        obj.field = field
        return obj

    def under(self, section: str) -> Problem:
        """The same problem, its field named within `section` (`launch`, `bench`, `eval`)."""
        return Problem(self, f"{section}.{self.field}" if self.field else None)


class SpecError(ServelabError):
    """A launch, bench, eval or sweep spec is invalid. The message names the value and the fix."""

    def __init__(self, problems: Sequence[str] | str):
        # once each: a sweep's cells or a load list's benchmarks repeat the same problem
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(dict.fromkeys(problems))
        super().__init__("\n".join(self.problems))


class ParseError(ServelabError):
    """A file or text could not be understood (import, logs, results)."""


class StoreError(ServelabError):
    """The database refused an operation (unknown run id, bad URL, ...)."""


class RunError(ServelabError):
    """A run could not be executed (vLLM failed to start, benchmark failed, ...)."""


class PortConflict(RunError):
    """The run's port was taken by another process before vLLM could listen on it."""

    def __init__(self, message: str, port: int, holder: str | None = None):
        super().__init__(message)
        self.port = port
        self.holder = holder  # "pid 123 (python3)", when the holder could be seen


class Cancelled(ServelabError):
    """The user cancelled the run; not a failure."""
