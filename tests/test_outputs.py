"""Output check: fixed prompts, token-id parsing, the comparison and its flag, stored answers in a real SQLite."""

from __future__ import annotations

import pytest

from runner import api
from runner.config import OutputCheckSpec, RunSpec
from runner.errors import RunError
from runner.outputs import _token_ids, compare_answers, first_difference, fixed_prompts
from runner.store import Store


def test_prompts_depend_on_the_seed_only() -> None:
    assert fixed_prompts(32, 0) == fixed_prompts(32, 0)
    assert fixed_prompts(32, 0) != fixed_prompts(32, 1)
    assert len(set(fixed_prompts(32, 0))) == 32
    assert fixed_prompts(3, 0) == fixed_prompts(32, 0)[:3]


def test_token_ids_from_either_vllm_form() -> None:
    assert _token_ids({"token_ids": [5, 6, 7]}) == [5, 6, 7]
    assert _token_ids({"logprobs": {"tokens": ["token_id:5", "token_id:1999"]}}) == [5, 1999]
    with pytest.raises(RunError, match="not a token id"):
        _token_ids({"logprobs": {"tokens": ["hello"]}})


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS)
    assert first_difference([], [4]) == 0


def _set(answers: list[list[int]]) -> dict[int, tuple[str, list[int]]]:
    return {i: (f"p{i}", a) for i, a in enumerate(answers)}


def test_compare_flags_below_the_threshold() -> None:
    base = _set([[1, 2, 3, 4]] * 10)
    nine = _set([[1, 2, 3, 4]] * 9 + [[1, 2, 0, 0]])
    agree = compare_answers(base, nine)
    assert (agree.compared, agree.identical, agree.identical_pct, agree.median_first_diff, agree.flagged) == (
        10, 9, 90.0, 2.0, False)  # 90 % is not below 90 %
    eight = _set([[1, 2, 3, 4]] * 8 + [[0, 2, 3, 4], [1, 2, 3, 0]])
    agree = compare_answers(base, eight)
    assert (agree.identical_pct, agree.median_first_diff, agree.flagged) == (80.0, 1.5, True)
    assert compare_answers(base, eight, threshold_pct=75.0).flagged is False
    # only prompts present (and equal) on both sides are compared
    assert compare_answers(base, {0: ("other", [1, 2, 3, 4])}) is None
    partial = compare_answers(base, {0: ("p0", [1, 2, 3, 4])})
    assert (partial.compared, partial.note) == (1, "1 of 10 prompts in common")


def test_stored_answers_compared_through_the_api(tmp_path) -> None:
    store = Store(tmp_path / "s.db")
    a, b, c = (store.create_run(label=x) for x in ("a", "b", "c"))
    prompts = fixed_prompts(4, 0)
    answers = [{"index": i, "prompt": p, "token_ids": [i, 7, 8], "text": "x", "finish_reason": "length"}
               for i, p in enumerate(prompts)]
    store.add_output_answers(a.id, answers, max_tokens=3, seed=0)
    store.add_output_answers(b.id, [{**x, "token_ids": [x["index"], 7, 9]} if x["index"] < 2 else x for x in answers],
                             max_tokens=3, seed=0)
    store.add_output_answers(c.id, answers, max_tokens=64, seed=0)
    agree = api.compare_outputs(store, a.id, b.id)
    assert (agree.identical, agree.compared, agree.identical_pct, agree.median_first_diff, agree.flagged) == (
        2, 4, 50.0, 2.0, True)
    assert api.output_check_summary(agree, "A", "B") == (
        "Output check, B against A: 2/4 answers identical (50.0 %); differing answers first differ at token 2 "
        "(median) — FLAGGED: below 90 % identical.")
    assert api.compare_outputs(store, a.id, c.id) is None  # another token budget: not the same check
    assert api.compare_outputs(store, a.id, a.id).identical_pct == 100.0
    api.delete_run(store, a.id)
    assert store.output_answers(a.id) == []


def test_output_check_switch_in_specs() -> None:
    launch = {"model": "m"}
    assert RunSpec.model_validate({"launch": launch}).output_check == OutputCheckSpec()
    for off in ("off", False, None):
        assert RunSpec.model_validate({"launch": launch, "output-check": off}).output_check is None
    spec = RunSpec.model_validate({"launch": launch, "output-check": {"prompts": 8, "max-tokens": 16}})
    assert spec.output_check == OutputCheckSpec(prompts=8, max_tokens=16, seed=0)
    assert RunSpec.model_validate({"launch": launch, "bench": []}).problems() == []
    assert RunSpec.model_validate({"launch": launch, "bench": [], "output-check": "off"}).problems() == [
        "The run has neither a benchmark nor an evaluation nor an output check; add a bench: or eval: section."]


def test_the_comparison_report_carries_the_output_check(tmp_path) -> None:
    store = Store(tmp_path / "s.db")
    a, b = store.create_run(label="tp1"), store.create_run(label="tp2")
    answers = [{"index": i, "prompt": p, "token_ids": [1, 2, 3, 4]} for i, p in enumerate(fixed_prompts(10, 0))]
    store.add_output_answers(a.id, answers, max_tokens=4, seed=0)
    store.add_output_answers(b.id, [{**x, "token_ids": [1, 2, 3, 5]} if x["index"] == 0 else x for x in answers],
                             max_tokens=4, seed=0)
    report = api.compare_report(store, a.id, b.id)
    assert not report.empty and report.bench == []
    assert api.render_comparison(report) == (
        "tp2 vs tp1\n\nOutput check\n\nOutput check, tp2 against tp1: 9/10 answers identical (90.0 %); differing "
        "answers first differ at token 3 (median).\n")
    csv = api.comparison_csv([report]).splitlines()
    assert csv[0].startswith("section,baseline,candidate,load_kind,load,workload,Metric,key,unit,tp1,tp2,Change")
    assert csv[1].startswith(f"output_check,{a.id},{b.id},,,,Identical answers,output_identical_pct,%,100,90,-10,")
