"""docs/conventions.md stays true to the code: every test it cites exists, every section the code cites is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conventions.md"


def _test_names(path: Path) -> set[str]:
    """test functions and Class::method names defined in a test file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}::{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


def test_every_cited_test_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    cited = re.findall(r"(test_\w+\.py)::(\w+(?:::\w+)?)", text)
    assert len(cited) > 30
    for file_name, name in cited:
        assert name in _test_names(ROOT / "tests" / file_name), f"{file_name}::{name}"


def test_every_cited_section_exists() -> None:
    sections = set(re.findall(r"^## (.+)$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE))
    for path in [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN" + ".md" not in text, path  # a file outside the repository
        for line in text.splitlines():
            if "docs/conventions.md" in line:
                for quoted in re.findall(r'"([^"]+)"', line.split("docs/conventions.md", 1)[1]):
                    assert quoted in sections, f"{path.name}: {quoted!r}"
