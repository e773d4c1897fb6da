"""Figures against the tables they stand for: every level line and every curve's last point is the run it names,
scored on the same tokens, read from the committed figures/<profile>/*.csv and tables (no training)."""
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from chameleon.config import ROOT  # noqa: E402
from chameleon.experiments import plots  # noqa: E402

FIGURES = ROOT / "figures"
RUN = ["regime", "protocol", "conditioning", "scored", "seed"]
# The table each profile's loss curves stand for, by task: notebook 06's one-seed table and notebook 07's loss
# against ROUGE-L on smoke (the notebooks' seed 0), the committed 3-seed runs on cpu.
TABLES = {("smoke", "lm"): "figures/smoke/06_results.csv", ("smoke", "instructions"): "figures/smoke/07_loss_rouge.csv",
          ("cpu", "lm"): "results/cpu/lm/compare-seeds3-runs.csv",
          ("cpu", "instructions"): "results/cpu/instructions/compare-seeds3-runs.csv"}


def drawn_by(function: str) -> list:
    """The CSVs of the committed figures that `function` drew (the PNG's metadata names it, plots.save)."""
    from PIL import Image

    return [png.with_suffix(".csv") for png in sorted(FIGURES.glob("*/*.png"))
            if Image.open(png).text.get("chameleon-plot") == function]


def table_of(profile: str, task: str) -> pd.DataFrame:
    """The runs of a profile's table, one row per RUN key; `scored` as runs.scored_label writes it where the table
    has none (the committed 3-seed tables score every token, the prefix rows aside, which their figures leave out)."""
    table = pd.read_csv(ROOT / TABLES[(profile, task)])
    if "scored" not in table:
        table = table[table.conditioning != "prefix"]
        table = table.assign(scored=np.where(table.protocol == "authors", "last", "all"))
    return table.assign(seed=table["seed"] if "seed" in table else 0).set_index(RUN)


def test_every_loss_curve_figure_has_its_table():
    curves = drawn_by("loss_curves")
    assert len(curves) >= 8  # smoke and cpu: 04, 05, 06 (loss, ppl), 07
    for csv in curves:
        assert (csv.parent.name, "instructions" if csv.stem.startswith("07_") else "lm") in TABLES, csv


@pytest.mark.parametrize("csv", drawn_by("loss_curves"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_loss_curves_draw_the_runs_of_the_table_they_name(csv):
    """One scoring per panel (an unadapted line scored from token 8 beside curves scored on every token drew the
    frozen model below LoRA), one row per drawn point, and every level line (a run evaluated only before
    training) and every curve's last point equal to its run's row of the table, to 1e-4 (a rerun on another CPU
    moves the last digits; the bug this guards against drew 1.3 nats off)."""
    drawn = pd.read_csv(csv)
    profile, task = csv.parent.name, "instructions" if csv.stem.startswith("07_") else "lm"
    assert (drawn.groupby("protocol")["scored"].nunique() == 1).all(), drawn.groupby("protocol")["scored"].unique()
    x = "step" if "step" in drawn else "epoch"
    assert not drawn.duplicated(subset=[*RUN, x]).any()  # the CSV holds each point drawn once
    table = table_of(profile, task)
    for key, run in drawn.groupby(RUN):
        last = run.sort_values(x).iloc[-1]
        level = run[x].nunique() == 1
        if key not in table.index:
            assert not level, f"{csv.name}: the level line {key} names no row of {TABLES[(profile, task)]}"
            continue  # a run no committed table holds (smoke's lora_full): its curve has nothing to differ from
        row = table.loc[key]
        for metric in ("val_loss", "val_ppl"):
            if metric in drawn and pd.notna(last[metric]):
                assert last[metric] == pytest.approx(row[metric], rel=1e-4, abs=1e-4), (csv.name, key, metric)


def test_loss_curves_refuse_a_panel_of_two_scorings(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    history = pd.DataFrame({"regime": ["unadapted", "unadapted", "lora", "lora"], "protocol": "causal",
                            "conditioning": "-", "scored": ["from 8", "all", "all", "all"], "seed": 0,
                            "epoch": [0, 0, 0, 1], "step": [0, 0, 0, 12], "val_loss": [2.54, 3.88, 3.88, 3.86]})
    with pytest.raises(ValueError, match="mix scorings"):
        plots.loss_curves(history, "unit", "curves")
    fig = plots.loss_curves(history[history.scored == "all"], "unit", "curves")
    level = [line for line in fig.axes[0].get_lines() if line.get_label() == "unadapted"]
    assert [line.get_ydata()[0] for line in level] == [3.88]


def test_loss_curves_write_the_points_they_draw(tmp_path, monkeypatch):
    """An evaluation at the epoch's last step and the epoch's own one are one point; a missing value is no point."""
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    history = pd.DataFrame({"regime": "lora", "protocol": "causal", "conditioning": "-", "scored": "all", "seed": 0,
                            "epoch": [0, 0.25, 0.6, 0.92, 1.0], "step": [0, 4, 8, 12, 12],
                            "val_loss": [3.9, 3.88, np.nan, 3.86, 3.86]})
    fig = plots.loss_curves(history, "unit", "curves")
    points = sum(len(line.get_xdata()) for line in fig.axes[0].get_lines())
    written = pd.read_csv(tmp_path / "figures" / "unit" / "curves.csv")
    assert points == len(written) == 3 and written.step.tolist() == [0, 4, 12]
    assert fig.axes[0].get_xlabel() == "optimizer step"


def test_the_papers_reference_lines_are_its_table():
    from chameleon.experiments.compare import PAPER_TABLE

    paper = PAPER_TABLE.set_index("regime")["val_loss"]
    for regime, loss in plots.PUBLISHED_LOSSES.items():
        assert loss == pytest.approx(paper[regime], abs=0.005), regime


def test_paired_forest_fills_what_its_caption_says(tmp_path, monkeypatch):
    """Filled: the drawn interval excludes 0, whatever the Holm correction says (that is written beside the row);
    a legend names the regimes' colours and the fill."""
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    paired = pd.DataFrame({"label": ["a - b", "c - b", "d - b"], "regime": ["chameleon", "lora", "chameleon"],
                           "difference": [-0.034, 0.01, -0.09], "low": [-0.059, -0.02, -0.11],
                           "high": [-0.009, 0.04, -0.07], "significant": [False, False, True]})
    ax = plots.paired_forest(paired, "unit", "forest", "unit").axes[0]
    faces = [matplotlib.colors.to_hex(p.get_markerfacecolor()) for p in ax.get_lines() if p.get_marker() == "o"]
    assert faces == [plots.REGIME_COLOURS["chameleon"].lower(), "#ffffff", plots.REGIME_COLOURS["chameleon"].lower()]
    assert [t.get_text() for t in ax.texts] == ["n.s. after Holm"]
    assert "filled: the interval excludes 0" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert labels == ["chameleon", "lora", "interval excludes 0", "interval includes 0"]
    written = pd.read_csv(tmp_path / "figures" / "unit" / "forest.csv")
    assert written.filled.tolist() == [True, False, True]
