"""A page quoting several runs' results (a recipe, a blog post, the seed's usage guide) → one part per run.

Pure: text in, parts out. Each printed "Serving Benchmark Result" block is a run, named by the line just above
it ("TP8 Benchmark Output¶" → "TP8"). An lm-eval table joins the run its own label line names ("- TP8", above
lm-eval's `local-completions (…), gen_kwargs: …` line); startup-log lines with KV-cache figures join the run
named by the line above them. Nothing is guessed: a block or table without a label, two blocks of one label, a
table whose label names no block, or a different number of tables and blocks is refused (`ParseError`, naming
what was found); startup lines that name no run unambiguously are left out and said so in `notes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from runner.errors import ParseError
from runner.parsers import KvCapacity, bench_block_spans, lm_eval_table_spans, parse_startup_log, text_lines

# lm-eval's line above its table: "local-completions (model=…,num_concurrent=32), gen_kwargs: (None), limit: …"
_LM_EVAL_CONFIG = re.compile(r"\bgen_kwargs:|\bnum_fewshot:\s*\S+,\s*batch_size:")
_HEADING_WORDS = re.compile(r"\s*\b(?:serving\s+)?(?:benchmark\s+)?(?:outputs?|results?)\s*$|\s*\bbenchmark\s*$",
                            re.IGNORECASE)
MAX_LABEL = 40


@dataclass(frozen=True)
class PagePart:
    """One run's share of a page: its name, its bench block, its lm-eval table and startup lines if any."""

    label: str
    block: str
    table: str | None = None
    log: str | None = None

    @property
    def text(self) -> str:
        """The part as it stood on the page, to keep in the run's folder."""
        return "\n".join(t for t in (f"{self.label}\n{self.block}", self.table, self.log) if t) + "\n"


@dataclass(frozen=True)
class PageSplit:
    parts: list[PagePart]
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def label_of(line: str) -> str | None:
    """The run name a heading or label line gives: `TP8 Benchmark Output¶` → `TP8`, `- TP8+DCP8` → `TP8+DCP8`,
    `### TP8 results:` → `TP8`. None for a line that is not a short name (a sentence, a table row, nothing)."""
    text = line.replace("¶", "").strip().lstrip("#*->•").strip().strip("*_`").strip()
    text = _HEADING_WORDS.sub("", text.rstrip(":").strip()).rstrip(":").strip()
    if not text or len(text) > MAX_LABEL or text.endswith(".") or "|" in text or "=" in text:
        return None
    return text


def _is_startup(line: str) -> bool:
    return line.strip() != "" and parse_startup_log(line) != KvCapacity()


def _line_above(lines: list[str], index: int, floor: int, skip=lambda line: False) -> str | None:
    """The nearest non-blank line above `index` and below `floor` that `skip` does not pass over."""
    for i in range(index - 1, floor, -1):
        if lines[i].strip() and not skip(lines[i]):
            return lines[i]
    return None


def split_page(text: str) -> PageSplit | None:
    """The runs of a page holding two or more bench blocks; None for a text with fewer (one result, as ever).
    Raises ParseError saying why a page of several blocks cannot be split without a guess."""
    lines = text_lines(text)
    blocks = bench_block_spans(lines)
    if len(blocks) < 2:
        return None
    tables = lm_eval_table_spans(lines)
    taken = sorted(blocks + tables)

    def floor(index: int) -> int:  # the last line of the block or table above `index` (-1: none)
        return max((end for _, end in taken if end < index), default=-1)

    found = [label_of(_line_above(lines, a, floor(a), _is_startup) or "") for a, _ in blocks]
    if None in found:
        raise ParseError(f"its block {found.index(None) + 1} has no name on the line above it (as 'TP8 Benchmark "
                         "Output' names the block below it)")
    names = [n for n in found if n is not None]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParseError(f"{names.count(twice[0])} blocks are named {twice[0]!r}")
    label_set = set(names)
    table_of: dict[str, str] = {}
    if tables and len(tables) != len(blocks):
        raise ParseError(f"it has {len(tables)} lm-eval table(s) for {len(blocks)} blocks")
    for a, b in tables:
        above = _line_above(lines, a, floor(a), lambda line: bool(_LM_EVAL_CONFIG.search(line)))
        name = label_of(above or "")
        if name is None:
            raise ParseError("an lm-eval table has no label line above it (as '- TP8' names the table below it)")
        if name not in label_set:
            raise ParseError(f"the lm-eval table labelled {name!r} matches no block's name "
                             f"({', '.join(names)})")
        if name in table_of:
            raise ParseError(f"2 lm-eval tables are labelled {name!r}")
        table_of[name] = "\n".join(lines[a : b + 1])
    logs, notes = _startup_lines(lines, taken, label_set)
    parts = [PagePart(name, "\n".join(lines[a : b + 1]), table_of.get(name), logs.get(name))
             for name, (a, b) in zip(names, blocks, strict=True)]
    if logs:
        notes += [f"{p.label}: no startup-log lines on the page" for p in parts if p.log is None]
    return PageSplit(parts, notes)


def _short(line: str, limit: int = 60) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"


def _startup_lines(lines: list[str], taken: list[tuple[int, int]],
                   names: set[str]) -> tuple[dict[str, str], list[str]]:
    """Startup-log lines (KV-cache figures) outside blocks and tables, by run name: a group of such lines (blank
    lines between them allowed) joins the run named by the line above it; a group under no run's name, and two
    groups under one name, are left out."""
    inside = {i for a, b in taken for i in range(a, b + 1)}
    groups: list[tuple[int | None, list[str]]] = []  # (index of the line above, the group's lines)
    last = -2  # index of the last startup line seen
    for i, line in enumerate(lines):
        if i in inside or not _is_startup(line):
            continue
        if groups and all(not lines[j].strip() for j in range(last + 1, i)):
            groups[-1][1].append(line)
        else:
            above = next((j for j in range(i - 1, -1, -1) if lines[j].strip()), None)
            groups.append((None if above is None or above in inside else above, [line]))
        last = i
    named = [(label_of(lines[above]) if above is not None else None, above, group) for above, group in groups]
    counts = {name: sum(1 for n, _, _ in named if n == name) for name, _, _ in named if name in names}
    kept: dict[str, str] = {}
    notes = []
    for name, above, group in named:
        if name is None or name not in names:
            where = f"under {_short(lines[above])!r}" if above is not None else "at the top of the page"
            notes.append(f"{len(group)} startup-log line(s) {where} name no run: left out")
        elif counts[name] > 1:
            notes.append(f"{counts[name]} groups of startup-log lines are named {name!r}: left out")
        else:
            kept[name] = "\n".join(group)
    return kept, list(dict.fromkeys(notes))
