"""runner.page: a page quoting several runs' results, split by the names it gives them."""

import pytest

from runner.errors import ParseError
from runner.page import label_of, split_page

SEED = __import__("pathlib").Path(__file__).parent / "fixtures" / "seed"


@pytest.mark.parametrize(("line", "name"), [
    ("TP8 Benchmark Output¶", "TP8"), ("- TP8+DCP8", "TP8+DCP8"), ("### TP8 results:", "TP8"),
    ("**TP2 serving benchmark output**", "TP2"), ("Run B:", "Run B"), ("TP8+DCP8 Benchmark", "TP8+DCP8"),
    ("We separately benchmarked the performance of TP8 and TP8+DCP8.", None), ("|gsm8k| 3|", None),
    ("==================================================", None), ("Benchmark Output¶", None), ("", None),
])  # fmt: skip
def test_label_of(line, name):
    assert label_of(line) == name


def test_markdown_headings_without_tables_split_and_one_block_does_not():
    tp8, dcp8 = (SEED / "tp8.txt").read_text(), (SEED / "tp8_dcp8.txt").read_text()
    split = split_page(f"# Results\n\n### TP8 results\n\n{tp8}\n\n### TP8+DCP8 results\n\n{dcp8}\n")
    assert [(p.label, p.table, p.log, p.block.count("Successful requests")) for p in split.parts] == [
        ("TP8", None, None, 1), ("TP8+DCP8", None, None, 1)]
    assert split.notes == []  # no startup lines at all: nothing to say
    assert split_page(f"### TP8 results\n{tp8}") is None  # one result: imported as ever
    with pytest.raises(ParseError, match="its block 2 has no name on the line above it"):
        split_page(f"TP8\n{tp8}{dcp8}")  # back to back: the second block's line above is the first's closing line
