"""Each MyST notebook source (notebooks/*.md) and its paired .ipynb hold the same cells.

Colab opens the .ipynb and nbmake executes it, while the book is built from the .md: the two
must not drift.  (`jupytext --diff` always exits 0, so it is no check.)  Fix a failure with
`make sync`.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.md"))


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks() -> None:
    assert SOURCES, "no notebooks/*.md found"


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.name)
def test_paired_ipynb_has_the_same_cells(md: Path) -> None:
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{md.name} has no paired {ipynb.name}: run `make sync`"
    from_md = jupytext.read(md)
    from_ipynb = nbformat.read(ipynb, as_version=4)
    assert _cells(from_md) == _cells(from_ipynb), f"{ipynb.name} differs from {md.name}: run `make sync`"


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.name)
def test_ipynb_is_committed_without_outputs(md: Path) -> None:
    nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("outputs")]
    assert not with_outputs, f"{md.with_suffix('.ipynb').name}: clear outputs of cells {with_outputs}"


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.name)
def test_notebook_has_colab_badge_pointing_to_its_ipynb_on_main(md: Path) -> None:
    text = md.read_text()
    assert f"colab.research.google.com/github/tcm-book/tcm-book/blob/main/notebooks/{md.stem}.ipynb" in text
