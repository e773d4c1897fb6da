"""docs/workshop.md's agenda adds up: its rows follow each other from 0:00 to 3:00, each row's minutes are its
span, and every notebook in it gets the reading time that the notebook announces in its first cell; the
README's notebook table lists every notebook with that same time."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minutes(clock: str) -> int:
    hours, mins = clock.split(":")
    return 60 * int(hours) + int(mins)


def announced(number: str) -> int:
    """The reading time a notebook's first cell announces: "**Time**: about N minutes"."""
    path = next((ROOT / "notebooks").glob(f"{number}_*.ipynb"))
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    return int(re.search(r"\*\*Time\*\*: about (\d+) minutes", first).group(1))


def agenda() -> list[tuple[int, int, int, str]]:
    text = (ROOT / "docs/workshop.md").read_text().split("## Agenda", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d:\d\d)-(\d:\d\d) \| (\d+) \| ([^|]+)\|", text, flags=re.M)
    return [(minutes(a), minutes(b), int(n), what.strip()) for a, b, n, what in rows]


def test_agenda_adds_up_to_three_hours():
    rows = agenda()
    assert rows and rows[0][0] == 0 and rows[-1][1] == 180
    assert all(end - start == n for start, end, n, _ in rows)
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), "the agenda's rows must follow each other"


def test_agenda_gives_each_notebook_its_announced_reading_time():
    notebooks = [(what[:2], n) for *_, n, what in agenda() if what[:2].isdigit()]
    assert len(notebooks) >= 8
    assert {number: n for number, n in notebooks} == {number: announced(number) for number, _ in notebooks}


def test_readme_lists_every_notebook_with_its_reading_time():
    """The README's notebook table: one row per notebook, with the minutes the notebook announces."""
    rows = re.findall(r"^\| \[(\d\d)\]\(notebooks/(\d\d_\w+)\.ipynb\) \|[^|]+\| (\d+) \|", (ROOT / "README.md").read_text(),
                      flags=re.M)
    on_disk = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [stem for _, stem, _ in rows] == on_disk
    assert {number: int(n) for number, _, n in rows} == {number: announced(number) for number, _, _ in rows}
