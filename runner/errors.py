"""The one small exception hierarchy of servelab. Turned into `st.error` or a CLI exit at the edge only."""


class ServelabError(Exception):
    """Base of every error servelab raises on purpose."""


class SpecError(ServelabError):
    """A launch, bench, eval or sweep spec is invalid. The message names the value and the fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ParseError(ServelabError):
    """A file or text could not be understood (import, logs, results)."""


class StoreError(ServelabError):
    """The database refused an operation (unknown run id, bad URL, ...)."""


class RunError(ServelabError):
    """A run could not be executed (vLLM failed to start, benchmark failed, ...)."""


class Cancelled(ServelabError):
    """The user cancelled the run; not a failure."""
