"""README's library snippets run as written, and README installs tcmlib the way it can be installed.

A new user copies README's Python example first: every ```python block of README.md is executed
(in order, in one namespace, as a reader pasting them into one session would) and must print.
tcmlib is not on a package index, so README must not tell anyone to ``pip install tcmlib``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_SECONDS = 60.0      # the snippets are meant to run in a few seconds on a CPU


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def test_block_extraction() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\nprint(x)\n```\n"
    assert python_blocks(text) == ["x = 1\n", "print(x)\n"]


def test_readme_python_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, code in enumerate(blocks, start=1):
        start = time.perf_counter()
        exec(compile(code, f"README.md, python block {i}", "exec"), namespace)
        took = time.perf_counter() - start
        assert took < MAX_SECONDS, f"README python block {i} took {took:.0f} s"
        assert capsys.readouterr().out.strip(), f"README python block {i} printed nothing"


def test_readme_does_not_install_tcmlib_from_a_package_index() -> None:
    text = README.read_text()
    assert not re.search(r"pip install tcmlib(?![\w\[.-])", text), "tcmlib is not on PyPI"
    assert 'pip install "tcmlib[all] @ git+https://github.com/tcm-book/tcm-book@main"' in text
    assert re.search(r"pip install -e ", text) and re.search(r'pip install "?\.', text)
