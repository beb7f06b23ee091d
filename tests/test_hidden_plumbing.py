"""Plumbing stays out of the reading flow: a chapter's ``glue(...)`` calls sit in hidden cells.

A reader of the built page sees prose with the numbers in it, and the code that teaches; the cells
that store those numbers for the prose (``tcmlib.runtime.glue``) are tagged ``remove-cell`` (or
``remove-input``), so the page does not show them.  Chapters listed in ``HIDDEN_GLUE`` are held to
this; the others join the list as they are rewritten.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
HIDDEN_GLUE = ["04_opis.md", "05_tcm_loss.md", "06_arcface_toy.md", "07_offline_benchmark.md",
               "08_frontier.md", "09_utility_curves.md", "10_ablations.md",
               "12_deploying_a_threshold.md", "13_what_the_evidence_says.md"]
HIDDEN_TAGS = {"remove-cell", "remove-input"}


def visible_glue_cells(path: Path) -> list[str]:
    """The first line of every code cell that calls glue( and is shown on the page."""
    nb = jupytext.read(path)
    return [cell.source.splitlines()[0][:60] for cell in nb.cells
            if cell.cell_type == "code" and "glue(" in cell.source
            and not HIDDEN_TAGS & set(cell.metadata.get("tags", []))]


def test_the_check_catches_a_visible_glue_call(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("# t\n\n```{code-cell} ipython3\nx = 1\nglue('x', x)\n```\n\n"
                  "```{code-cell} ipython3\n:tags: [remove-cell]\n\nglue('y', 2)\n```\n")
    assert visible_glue_cells(md) == ["x = 1"]


@pytest.mark.parametrize("name", HIDDEN_GLUE)
def test_glue_calls_are_in_hidden_cells(name: str) -> None:
    shown = visible_glue_cells(NOTEBOOKS / name)
    assert not shown, f"{name}: cells that call glue( and are shown on the page: {shown}"
