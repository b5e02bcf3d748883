"""The ```python blocks of README.md and docs/*.md run as written.

Each file's blocks run in order in one fresh namespace (a block may use what an earlier block of the same
file defined), in a temporary working directory, with matplotlib's Agg backend. A block that cannot run in a
test (real data, a GPU, a trained checkpoint, minutes of compute) carries the marker
``<!-- no-test: reason -->`` on the line right before its opening fence and is skipped; every other block of
the file still runs.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = re.compile(r"^\s*<!--\s*no-test\b.*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def python_blocks(path: Path) -> list:
    """``(line, source, skipped)`` for each python block of ``path``; ``line`` is the opening fence's (1-based)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang.lower() in ("python", "py", "python3"):
            skipped = start > 0 and bool(NO_TEST.match(lines[start - 1]))
            blocks.append((start + 1, "\n".join(body) + "\n", skipped))
    return blocks


def test_python_blocks_are_found():
    found = {path.name: python_blocks(path) for path in DOC_FILES}
    assert found["quickstart.md"] and found["README.md"]
    for name, blocks in found.items():
        for line, source, _ in blocks:
            assert source.strip(), f"{name}:{line}: empty python block"


@pytest.mark.parametrize("path", [p for p in DOC_FILES if python_blocks(p)], ids=lambda p: p.name)
def test_doc_blocks_run(path, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"docs_{path.stem}"}
    ran = 0
    for line, source, skipped in python_blocks(path):
        if skipped:
            continue
        name = f"{path.relative_to(ROOT)}:{line}"
        failure = None
        try:
            exec(compile(source, name, "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - any failure of a documented block is the test's failure
            frames = traceback.format_exception(type(err), err, err.__traceback__)
            failure = f"the python block at {name} fails: {type(err).__name__}: {err}\n{''.join(frames[-4:])}"
        if failure:
            pytest.fail(failure, pytrace=False)
        ran += 1
    if not ran:
        pytest.skip(f"every python block of {path.name} is marked no-test")


def test_no_test_marker_skips_only_its_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\nx = 1\n```\n\n<!-- no-test: needs a GPU -->\n```python\nimport cuda\n```\n\n"
                   "```bash\nls\n```\n\n  ```python\n  y = x + 1\n  ```\n", encoding="utf-8")
    blocks = python_blocks(doc)
    assert [(line, skipped) for line, _, skipped in blocks] == [(3, False), (8, True), (16, False)]
    assert blocks[2][1] == "y = x + 1\n"
