"""docs/from-trl.md is the parity table as generated, and every case the table cites is a parity test."""

import importlib
from pathlib import Path

import pytest

from tests.parity.table import ROWS, markdown

DOC = Path(__file__).parents[2] / "docs" / "from-trl.md"


def cases_of(module_name: str) -> set[str]:
    module = importlib.import_module(f"tests.parity.test_{module_name}")
    names = set()
    for table in ("EQUAL", "DIFFERS", "CASES"):
        names |= set(getattr(module, table, {}))
    names |= {name.removeprefix("test_").replace("_", " ") for name in dir(module) if name.startswith("test_")}
    return names


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row[0]} {row[1]}")
def test_every_cited_case_exists(row):
    for cited in row[4]:
        module_name, case = cited.split("::")
        known = cases_of(module_name)
        assert case in known or any(name.startswith(case) for name in known), cited


def test_the_document_is_current():
    assert DOC.read_text() == markdown(), "regenerate it: python -m tests.parity.table > docs/from-trl.md"
