"""BENCHMARKS.md quotes the tables that the benchmark scripts wrote (benchmarks/results/), not stale copies."""
from chameleon.config import ROOT


def test_benchmarks_md_quotes_every_committed_table():
    doc = set((ROOT / "BENCHMARKS.md").read_text().splitlines())
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    assert results
    for table in results:
        rows = [line for line in table.read_text().splitlines() if line.startswith("|")]
        assert rows, f"{table.name} holds no table"
        missing = [row for row in rows if row not in doc]
        assert not missing, f"BENCHMARKS.md lacks these rows of {table.name} (paste its tables again): {missing}"
