"""Output check: every run answers the same fixed prompts greedily; two runs' answers are compared.

A faster parallel layout is only a win if it still gives the same answers. The prompts are fixed by a
seed, the answers are token ids (so the first differing position is exact, whatever the tokenizer makes
of them), and the requests go one at a time: a batch of one on both sides, so batching differences
between two launches cannot be mistaken for a wrong layout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import httpx

from runner.config import OutputCheckSpec
from runner.errors import Cancelled, RunError

FLAG_BELOW_PCT = 90.0
"""A candidate whose share of answers identical to its baseline's is below this is flagged."""

_WORDS = tuple(
    "the river city market winter engine signal window garden teacher bridge memory library model cache "
    "token morning island question doctor village number system simple bright quiet careful honest brave "
    "journey thousand step world people house family water country report service reason result power".split()
)
_OPENINGS = ("Once upon a time", "The report says that", "In the morning", "Question:", "Write about",
             "My favourite", "The first rule is", "Yesterday the")


def fixed_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts that depend only on `seed` (not on the model or its tokenizer)."""
    rng = random.Random(seed)  # noqa: S311 -- a reproducible prompt set, not a secret
    prompts = []
    for i in range(count):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 24)))
        prompts.append(f"{_OPENINGS[i % len(_OPENINGS)]} {words}")
    return prompts


@dataclass
class Answer:
    index: int
    prompt: str
    token_ids: list[int]
    text: str
    finish_reason: str | None


def _token_ids(choice: dict[str, Any]) -> list[int]:
    """vLLM's `token_ids` (return_token_ids), else the `token_id:N` strings of return_tokens_as_token_ids."""
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens") or []
    ids = []
    for tok in tokens:
        if not isinstance(tok, str) or not tok.startswith("token_id:"):
            raise RunError(f"the server returned token {tok!r}, not a token id; is it vLLM?")
        ids.append(int(tok.removeprefix("token_id:")))
    return ids


def answer_prompts(
    base_url: str,
    model: str,
    spec: OutputCheckSpec,
    *,
    timeout_s: float = 300.0,
    cancelled: Callable[[], bool] = lambda: False,
) -> list[Answer]:
    """Ask the server's OpenAI completions endpoint for every fixed prompt, greedily, one at a time."""
    answers = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s) as client:
        for i, prompt in enumerate(fixed_prompts(spec.prompts, spec.seed)):
            if cancelled():
                raise Cancelled("cancelled during the output check")
            body = {
                "model": model, "prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0.0,
                "seed": spec.seed, "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
            }
            try:
                resp = client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                raise RunError(f"output check: prompt {i} got no answer: {exc}") from None
            if resp.status_code != 200:
                raise RunError(f"output check: prompt {i} answered HTTP {resp.status_code}: {resp.text[:300]}")
            choice = resp.json()["choices"][0]
            answers.append(Answer(i, prompt, _token_ids(choice), choice.get("text") or "", choice.get("finish_reason")))
    return answers


@dataclass(frozen=True)
class OutputAgreement:
    """A candidate's answers against its baseline's, prompt by prompt."""

    compared: int
    identical: int
    identical_pct: float
    median_first_diff: float | None  # token position (0-based) of the first difference, over differing answers
    flagged: bool
    threshold_pct: float
    note: str = ""


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Position of the first differing token; None for identical answers. An answer that stops early
    differs where the shorter one ends."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_answers(
    baseline: dict[int, tuple[str, list[int]]],
    candidate: dict[int, tuple[str, list[int]]],
    threshold_pct: float = FLAG_BELOW_PCT,
) -> OutputAgreement | None:
    """Compare answers to the same prompts (index → (prompt, token ids)); None when no prompt is shared."""
    shared = [i for i in sorted(baseline) if i in candidate and baseline[i][0] == candidate[i][0]]
    if not shared:
        return None
    diffs = [first_difference(baseline[i][1], candidate[i][1]) for i in shared]
    positions = [d for d in diffs if d is not None]
    identical = len(shared) - len(positions)
    pct = identical / len(shared) * 100.0
    note = ""
    if len(shared) < max(len(baseline), len(candidate)):
        note = f"{len(shared)} of {max(len(baseline), len(candidate))} prompts in common"
    return OutputAgreement(len(shared), identical, pct, float(median(positions)) if positions else None,
                           pct < threshold_pct, threshold_pct, note)

