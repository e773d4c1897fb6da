"""Numbers in prose cannot go stale: every decimal number and percentage that the README (outside its generated
blocks), docs/workshop.md (outside its generated block) and the markdown cells of the notebooks quote is
registered in tests/data/numbers.csv with its source, and the source still gives it.

The rule: a number is a decimal (`3.61`) or a percentage (`94%`, `20 %`) in running text; inline code, code
blocks, link targets and HTML comments are not prose and are skipped (commands, versions, addresses). Integers
(counts, seeds, sizes) are not checked. Each registry row names a file, the number as written, and one source:

- `output`: a committed output of a notebook cell (source = notebook, selector = `<cell id>::<regex>`, the regex's
  first group is the number in the output, which must round to the written one);
- `csv`: a committed table (source = CSV path, selector = `<pandas query>::<column>`, `*100` after the column
  for a percentage), whose one selected value must round to the written one;
- `constant`: not measured by the kit (the paper's table, a reference configuration, an arXiv id); `why` says so.

A row stands for every occurrence of that number in that file. Numbers of the notebooks in PENDING (and of
their entries in docs/workshop.md's answer key) are not yet registered: `python tests/test_numbers.py` lists
them with their context, for the registry.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout (no chameleon import: this test stays under 2 s)
REGISTRY = Path(__file__).parent / "data" / "numbers.csv"
GENERATED = re.compile(r"<!-- (\w+): .*?-->.*?<!-- /\1 -->", re.S)  # `python -m chameleon report`'s blocks

# Notebooks whose prose (and whose entries in docs/workshop.md's key) other work is still changing: their numbers
# are listed by `python tests/test_numbers.py` for the lead to register, then the entry leaves this set.
PENDING = set()

NUMBER = re.compile(r"(?<![\d.])(?<!\d\.)(\d+(?:\.\d+)?\s?%|\d+\.\d+)(?!\d|\.\d)")
NOT_PROSE = [re.compile(p, re.S) for p in (r"```.*?```", r"<!--.*?-->", r"`[^`\n]*`", r"\]\([^)]*\)",
                                           r"\*\*\d\d\.\d\b")]  # the last: the key's labels, **01.2


def prose(text: str) -> str:
    """The text with code, comments, link targets and indented code blocks blanked out, lines kept."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    lines, code, block = text.splitlines(), False, set()
    for i, line in enumerate(lines):  # an indented code block: 4 spaces after a blank line, to the next text;
        # found before blanking, so that a blanked label never makes its line look indented
        code = line.startswith("    ") and (code or i == 0 or not lines[i - 1].strip())
        block |= {i} if code else set()
    for pattern in NOT_PROSE:
        text = pattern.sub(blank, text)
    return "\n".join(" " * len(line) if i in block else line for i, line in enumerate(text.splitlines()))


def documents(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(file, unit, markdown) for every piece of prose checked; the unit is a notebook's number ("01"), in
    docs/workshop.md that of the key entry a line belongs to, otherwise "-"."""
    docs = [("README.md", "-", GENERATED.sub("", (root / "README.md").read_text()))]
    unit, lines = "-", []
    workshop = GENERATED.sub("", (root / "docs/workshop.md").read_text())
    for line in workshop.splitlines():
        label = re.match(r"\*\*(\d\d)(?:\.\d| questionnaire)|\*\*.*\(notebook (\d\d)\)", line)
        if label or line.startswith("#"):
            unit = (label.group(1) or label.group(2)) if label else "-"
        lines.append((unit, line))
    for u in dict.fromkeys(u for u, _ in lines):
        docs.append(("docs/workshop.md", u, "\n".join(line if v == u else "" for v, line in lines)))
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        docs.append((f"notebooks/{path.name}", path.name[:2], text))
    return docs


def found(root: Path = ROOT) -> pd.DataFrame:
    """Every number of the checked prose: file, unit, number as written, its line."""
    rows = []
    for file, unit, text in documents(root):
        plain = prose(text)
        for line, shown in zip(plain.splitlines(), text.splitlines()):
            rows += [{"file": file, "unit": unit, "number": m.group(1), "context": shown.strip()[:160]}
                     for m in NUMBER.finditer(line)]
    return pd.DataFrame(rows, columns=["file", "unit", "number", "context"])


def registry() -> pd.DataFrame:
    return pd.read_csv(REGISTRY, dtype=str, keep_default_na=False, comment="#")


def rounds_to(value: float, written: str) -> bool:
    """Whether a source value, rounded as the number is written, is that number (signs are in the prose; a
    percentage's source gives it in percent, e.g. a CSV column with `*100`)."""
    digits = written.rstrip("% ")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return f"{abs(value):.{decimals}f}" == digits


def source_value(row) -> float | None:
    """The value the row's source gives, or None for a constant."""
    if row.kind == "constant":
        assert row.why.strip(), f"{row.file} {row.number}: a constant needs its why"
        return None
    target, pick = row.selector.rsplit("::", 1) if row.kind == "csv" else row.selector.split("::", 1)
    if row.kind == "csv":
        table = pd.read_csv(ROOT / row.source)
        column, _, scale = pick.partition("*")
        values = table.query(target)[column]
        assert len(values) == 1, f"{row.source} [{target}] selects {len(values)} rows, not one"
        return float(values.iloc[0]) * float(scale or 1)
    if row.kind == "output":
        cells = {c.get("id"): c for c in json.loads((ROOT / row.source).read_text())["cells"]}
        assert target in cells, f"{row.source} has no cell {target}"
        out = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                      for o in cells[target].get("outputs", []))
        match = re.search(pick, out)
        assert match, f"{row.source} cell {target}: /{pick}/ finds nothing in its output"
        return float(match.group(1))
    raise AssertionError(f"{row.file} {row.number}: unknown kind {row.kind!r}")


NUMBERS, REGISTERED = found(), registry()


def test_every_number_in_prose_is_registered():
    known = set(zip(REGISTERED.file, REGISTERED.number))
    missing = NUMBERS[~NUMBERS.unit.isin(PENDING)]
    missing = missing[[k not in known for k in zip(missing.file, missing.number)]]
    assert missing.empty, ("numbers in prose without a source in tests/data/numbers.csv:\n"
                           + missing.drop_duplicates(["file", "number"]).to_string(index=False))


def test_every_registered_number_is_still_quoted():
    quoted = set(zip(NUMBERS.file, NUMBERS.number))
    stale = REGISTERED[[k not in quoted for k in zip(REGISTERED.file, REGISTERED.number)]]
    assert stale.empty, "registered numbers no longer in their file (remove the rows):\n" + stale.to_string()


@pytest.mark.parametrize("row", list(REGISTERED.itertuples(index=False)), ids=lambda r: f"{r.file}:{r.number}")
def test_each_registered_number_is_what_its_source_gives(row):
    value = source_value(row)
    assert value is None or rounds_to(value, row.number), (
        f"{row.file} says {row.number}, but {row.kind} {row.source} [{row.selector}] gives {value}")


if __name__ == "__main__":  # the numbers still to register: pending notebooks first
    numbers = found()
    known = set(zip(registry().file, registry().number))
    todo = numbers[[k not in known for k in zip(numbers.file, numbers.number)]]
    for (file, unit), part in todo.groupby(["file", "unit"], sort=True):
        print(f"\n## {file} (unit {unit}{', pending' if unit in PENDING else ''})")
        for r in part.itertuples():
            print(f"  {r.number:>8}  {r.context}")
