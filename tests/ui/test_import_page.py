"""Import page through AppTest: uploads and pasted text become runs; a bad file creates nothing."""

from __future__ import annotations

from pathlib import Path

SEED = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "seed"


def import_button(at):
    return next(b for b in at.button if b.label.startswith("Import"))


def test_pasted_bench_block_with_its_configuration(open_page, store) -> None:
    at = open_page("import_results")
    at.text_area(key="import.text").set_value((SEED / "tp8_dcp8.txt").read_text())
    at.text_input(key="import.label").set_value("TP8+DCP8")
    at.selectbox(key="import.tp").set_value(8).run()
    at.selectbox(key="import.dcp").set_value(8).run()
    preview = at.dataframe[0].value
    assert preview.iloc[0]["detected"] == "benchmark result (printed block)"
    assert preview.iloc[0]["content"] == "994 requests, 695.13 output tok/s"
    import_button(at).click().run()
    assert not at.exception
    assert at.success[0].value == "Imported 1 run(s): #1."
    run = store.get_run(1)
    assert (run.label, run.tensor_parallel_size, run.decode_context_parallel_size) == ("TP8+DCP8", 8, 8)
    assert store.run_metrics(1)[0]["output_throughput"] == 695.13
    assert at.text_area(key="import.text").value == ""  # ready for the next one


def test_uploaded_files_each_become_a_run(open_page, store) -> None:
    at = open_page("import_results")
    files = [(n, (SEED / n).read_bytes(), "text/plain") for n in ("tp8.txt", "gsm8k_tp8.txt", "startup_tp8_dcp8.log")]
    at.file_uploader[0].set_value(files).run()
    assert list(at.dataframe[0].value["detected"]) == ["benchmark result (printed block)", "lm-eval results (table)",
                                                       "vLLM server log (KV capacity)"]
    import_button(at).click().run()
    assert at.success[0].value == "Imported 3 run(s): #1, #2, #3."
    assert [r.label for r in sorted(store.list_runs(), key=lambda r: r.id)] == ["tp8", "gsm8k_tp8", "startup_tp8_dcp8"]
    assert store.get_run(3).kv_cache_tokens == 5_721_088
    assert [e.value for e in store.eval_results(2)] == [0.9416, 0.9409]


def test_a_bad_file_is_named_and_nothing_is_created(open_page, store) -> None:
    at = open_page("import_results")
    at.file_uploader[0].set_value([("tp8.txt", (SEED / "tp8.txt").read_bytes(), "text/plain"),
                                   ("notes.json", b'{"hello": "world"}', "application/json")]).run()
    assert any(e.value.startswith("notes.json: Found JSON with") for e in at.error)
    assert import_button(at).disabled
    assert store.list_runs() == []


def test_nothing_to_import_disables_the_button(open_page, store) -> None:
    at = open_page("import_results")
    assert import_button(at).disabled and import_button(at).label == "Import 0 file(s)"


def test_dcp_keeps_its_value_while_the_tp_size_changes(open_page, store) -> None:
    """In the browser, a change of TP left DCP blank ("—" or "Choose an option", imported as unknown)."""
    at = open_page("import_results")

    def shown() -> tuple[object, object, list[str]]:
        dcp = at.selectbox(key="import.dcp")
        return at.selectbox(key="import.tp").value, dcp.value, dcp.options

    at.selectbox(key="import.tp").set_value(8).run()
    assert shown() == (8, 1, ["1", "2", "4", "8"])  # a TP size given: DCP 1, not blank
    at.selectbox(key="import.dcp").set_value(2).run()
    at.selectbox(key="import.tp").set_value(4).run()
    assert shown() == (4, 2, ["1", "2", "4"])  # still divides: kept
    at.selectbox(key="import.tp").set_value(None).run()
    assert shown() == (None, None, ["—"])
    at.selectbox(key="import.tp").set_value(16).run()
    assert shown()[:2] == (16, 2)  # back from unknown: the DCP picked, not blank
    at.selectbox(key="import.dcp").set_value(8).run()
    at.selectbox(key="import.tp").set_value(4).run()
    assert shown()[:2] == (4, 4)  # 8 does not divide 4: the nearest below that does
    at.selectbox(key="import.tp").set_value(8).run()
    assert shown()[:2] == (8, 8)  # and TP 8 again brings the 8 back
    assert not at.exception
    at.text_area(key="import.text").set_value((SEED / "tp8_dcp8.txt").read_text()).run()
    import_button(at).click().run()
    run = store.get_run(1)
    assert (run.tensor_parallel_size, run.decode_context_parallel_size) == (8, 8)


def test_lm_eval_table_added_to_the_run_of_its_bench_block(open_page, store) -> None:
    from runner import api

    api.import_files(store, [("tp8.txt", (SEED / "tp8.txt").read_bytes())], label="TP8")
    at = open_page("import_results")
    into = at.selectbox(key="import.into")
    assert into.value == 0 and into.options == ["no — a new run per file", "#1 TP8 (succeeded)"]
    into.set_value(1).run()
    assert at.text_input(key="import.label").disabled  # the run keeps its own name
    at.file_uploader[0].set_value([("gsm8k_tp8.txt", (SEED / "gsm8k_tp8.txt").read_bytes(), "text/plain")]).run()
    import_button(at).click().run()
    assert not at.exception
    assert at.success[0].value == "Added 1 file(s) to run #1."
    assert len(store.list_runs()) == 1
    assert [(e.filter, e.value, e.stderr) for e in store.eval_results(1)] == [
        ("flexible-extract", 0.9416, 0.0065), ("strict-match", 0.9409, 0.0065)]
    assert store.run_metrics(1)[0]["output_throughput"] == 485.78  # the bench result is still there


def test_a_launched_run_keeps_its_configuration(open_page, store) -> None:
    from runner.models import RunStatus, utcnow

    run = store.create_run(label="here", model="org/model", tensor_parallel_size=2, status=RunStatus.succeeded,
                           finished_at=utcnow())
    store.create_run(label="still running", status=RunStatus.benchmarking)
    at = open_page("import_results")
    assert at.selectbox(key="import.into").options == ["no — a new run per file", "#1 here (succeeded)"]
    at.selectbox(key="import.into").set_value(run.id).run()
    assert at.selectbox(key="import.tp").disabled and at.text_input(key="import.model").disabled
    at.text_area(key="import.text").set_value((SEED / "gsm8k_tp8_dcp8.txt").read_text()).run()
    import_button(at).click().run()
    assert at.success[0].value == "Added 1 file(s) to run #1."
    assert store.get_run(1).tensor_parallel_size == 2 and [e.value for e in store.eval_results(1)] == [0.9386, 0.9371]


def test_pasted_seed_page_becomes_its_two_runs(open_page, store) -> None:
    """The seed page pasted whole: one run per bench block, named as the page names it, its GSM8K table and KV
    lines with it; the page says what it made and links the two to Compare."""
    at = open_page("import_results")
    page = (SEED.parent / "seed_page.txt").read_text()
    at.text_area(key="import.text").set_value(page).run()
    assert not at.error
    preview = at.dataframe[0].value
    assert list(preview["detected"]) == ["run “TP8” of a page of 2", "run “TP8+DCP8” of a page of 2"]
    assert list(preview["content"]) == [
        "998 requests, 485.78 output tok/s, gsm8k flexible-extract 0.9416",
        "994 requests, 695.13 output tok/s, gsm8k flexible-extract 0.9386, KV cache 5,721,088 tokens"]
    assert import_button(at).label == "Import 1 file(s) as 2 runs"
    import_button(at).click().run()
    assert not at.exception
    assert at.success[0].value == "Imported 2 run(s): #1, #2."
    assert at.info[0].value == (
        "2 runs from one page (pasted.txt): #1 TP8 (998 requests, 485.78 output tok/s, gsm8k flexible-extract "
        "0.9416), #2 TP8+DCP8 (994 requests, 695.13 output tok/s, gsm8k flexible-extract 0.9386, KV cache 5,721,088 "
        "tokens). TP8: no startup-log lines on the page.")
    runs = sorted(store.list_runs(), key=lambda r: r.id)
    assert [(r.label, r.kv_cache_tokens) for r in runs] == [("TP8", None), ("TP8+DCP8", 5_721_088)]
    assert [store.run_metrics(r.id)[0]["output_throughput"] for r in runs] == [485.78, 695.13]
    assert [[e.value for e in store.eval_results(r.id)] for r in runs] == [[0.9416, 0.9409], [0.9386, 0.9371]]
    assert any(link.label == "Compare them →" for link in at.get("page_link"))
