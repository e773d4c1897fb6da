"""Notebook helpers and the notebooks' structure.

`make test` executes every notebook once, on the smoke profile, with nbval in lax mode: each cell
must run without error, and the outputs of the cells tagged nbval-check-output must match the
committed ones.
"""
import json
import os
import re

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")

from chameleon.experiments import plots  # noqa: E402
from chameleon.experiments.analysis import adapter_stats, cluster_examples  # noqa: E402
from chameleon.experiments.notebooks import notebook_paths  # noqa: E402


def test_notebooks_are_numbered_and_have_one_parameters_cell():
    paths = notebook_paths()
    assert [p.name[:2] for p in paths] == [f"{i:02d}" for i in range(1, len(paths) + 1)]
    for path in paths:
        cells = json.loads(path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path.name
        assert "CHAMELEON_PROFILE" in "".join(tagged[0]["source"]), path.name
        assert not any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells), path.name


def test_committed_notebooks_hold_no_timings_or_paths_of_a_run():
    for path in notebook_paths():
        nb = json.loads(path.read_text())
        assert "papermill" not in nb["metadata"], path.name
        assert not any(k in c["metadata"] for c in nb["cells"] for k in ("execution", "papermill")), path.name


def test_output_checks_are_cell_tags_that_nbval_reads():
    """A marker comment nbval does not parse checks nothing ("# NBVAL_CHECK_OUTPUT: why" is not its marker): the
    checked cells carry the tag, and no code says it in a comment."""
    from nbval.plugin import metadata_tags

    assert metadata_tags["nbval-check-output"] == "check"
    tagged = 0
    for path in notebook_paths():
        for cell in json.loads(path.read_text())["cells"]:
            assert "NBVAL_" not in "".join(cell["source"]), path.name
            tagged += "nbval-check-output" in cell["metadata"].get("tags", [])
    assert tagged >= 20


def test_compared_outputs_hold_no_model_float_to_three_decimals():
    """nbval runs in lax mode: only cells tagged nbval-check-output are compared, and their committed
    outputs must be the same on every CPU, so no float with three or more decimals may appear in them
    (model-computed numbers are checked by assertion cells with a stated tolerance instead)."""
    for path in notebook_paths():
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] != "code" or "nbval-check-output" not in cell["metadata"].get("tags", []):
                continue
            text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                           for o in cell.get("outputs", []))
            assert not re.search(r"\d\.\d{3,}", text), (path.name, i, text[:200])


def test_save_writes_png_and_csv_under_the_profile(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAMELEON_OUTPUTS", raising=False)
    monkeypatch.setattr(plots, "ROOT", tmp_path)
    fig = plots.cluster_sizes(np.array([0, 0, 1, 2, 2, 2]), profile="unit")
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel() and fig.axes[0].get_title()
    data = pd.read_csv(tmp_path / "figures" / "unit" / "02_cluster_sizes.csv")
    assert data["examples"].tolist() == [2, 1, 3]
    assert (tmp_path / "figures" / "unit" / "02_cluster_sizes.png").stat().st_size > 0


def test_loss_curves_use_the_regime_colours(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAMELEON_OUTPUTS", raising=False)
    monkeypatch.setattr(plots, "ROOT", tmp_path)
    history = pd.DataFrame({"regime": ["lora"] * 2 + ["chameleon"] * 2, "protocol": "causal",
                            "conditioning": "batch_mean", "epoch": [0, 1] * 2, "val_loss": [3.0, 2.5, 3.0, 2.4]})
    fig = plots.loss_curves(history, "unit", "curves")
    colours = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert colours == {"lora": plots.REGIME_COLOURS["lora"].lower(), "chameleon": plots.REGIME_COLOURS["chameleon"].lower()}


def test_adapter_stats_match_the_explicit_update():
    """Norms and cosines computed without forming B @ A equal those of the explicit d_out x d_in matrices."""
    import torch
    from torch import nn

    from chameleon.adapters.hypernetwork import ChameleonHead

    torch.manual_seed(0)
    head = ChameleonHead(nn.Linear(6, 10, bias=False), d_cond=5, rank=2, alpha=1.0, flavour="authors", hidden=(4,))
    cond, labels = torch.randn(8, 5), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    norms, cos = adapter_stats(head, cond, labels)
    updates = []
    for c in range(3):
        A, B = head.generate_adapter(cond[labels == c].mean(0))
        updates.append((head.scaling * B @ A).flatten().detach())
    U = torch.stack(updates)
    assert np.allclose(norms["norm_update"], U.norm(dim=1).numpy(), rtol=1e-5)
    expected = torch.nn.functional.cosine_similarity(U[:, None], U[None], dim=-1).numpy()
    assert np.allclose(cos.to_numpy(), expected, atol=1e-5)


def test_cluster_examples_takes_the_first_of_each_cluster():
    df = cluster_examples(["a", "b", "c", "d"], np.array([1, 0, 1, 0]), per_cluster=1)
    assert df.to_dict("list") == {"cluster": [0, 1], "text": ["b", "a"]}


def test_generations_line_up_the_runs_of_each_example():
    from chameleon.experiments.analysis import generations, side_by_side

    g = [{"instruction": "Name it.", "input": "", "reference": "X", "output": o} for o in ("a", "b")]
    runs = [{"config": {"regime": "lora", "protocol": "causal", "conditioning": "task"}, "generations": g},
            {"config": {"regime": "chameleon", "protocol": "authors", "conditioning": "task"}, "generations": [g[1], {**g[0], "output": ""}]}]
    df = generations(runs, n=2)
    assert df[df.example == 0]["output"].tolist() == ["a", "b"]
    assert df["conditioning"].tolist() == ["-", "-", "task", "task"]
    text = side_by_side(df)
    assert "lora / causal:" in text and "chameleon (task) / authors:" in text and "(empty)" in text


def test_scored_tokens_causal_scores_the_response_paper_the_last_position():
    from chameleon.experiments.analysis import scored_tokens
    from chameleon.backbones import load_backbone
    from chameleon.config import Config

    cfg = Config.from_profile("smoke")
    _, tok = load_backbone(cfg.backbone, seed=0, cache_dir=cfg.cache_dir)
    df = scored_tokens("### Instruction:\nHi\n### Response:\n", "Hello there.", tok, 32)
    assert (df["authors target"] != "").sum() == 1 and df["position"].iloc[-1] == 31
    causal = df[df["causal target"] != ""]["causal target"].tolist()
    assert causal[-1] == repr(tok.eos_token) and "".join(eval(t) for t in causal[:-1]) == "Hello there."


def test_tidy_prints_integers_mean_std_and_dashes():
    from chameleon.experiments.analysis import tidy

    table = pd.DataFrame({"regime": ["lora", "chameleon"], "trainable_params": [198912.0, np.nan], "seeds": [3, 3],
                          "val_loss": [3.64654, np.nan], "val_loss_std": [0.062, np.nan]})
    out = tidy(table)
    assert out["trainable_params"].tolist() == ["198,912", "–"]
    assert out["val_loss"].tolist() == ["3.647 ± 0.062", "–"] and "val_loss_std" not in out


def test_results_bars_draw_error_bars_and_prefix_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "ROOT", tmp_path)
    table = pd.DataFrame({"regime": ["lora", "chameleon", "chameleon"], "protocol": "causal",
                          "conditioning": ["-", "prefix", "batch_mean"], "seeds": 3, "val_loss": [3.6, 2.5, 3.6],
                          "val_ppl": [37.0, 12.0, 37.0], "val_loss_std": [0.05, 0.04, 0.01], "val_ppl_std": [2.0, 0.5, 0.4]})
    fig = plots.results_bars(table, "unit")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "chameleon\n(prefix)"  # drawn last, after a gap
    x = [p.get_x() for p in ax.patches]
    assert x[2] - x[1] > x[1] - x[0] + 0.5
    from matplotlib.container import ErrorbarContainer

    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers) and "3 seeds" in fig._suptitle.get_text()
    # baselines scored on the prefix row's tokens (compare's `scored` "from P") stand apart beside it
    table["scored"] = ["all", "from 8", "all"]
    table = pd.concat([table, table.iloc[[0]].assign(scored="from 8")], ignore_index=True)
    labels = [t.get_text() for t in plots.results_bars(table, "unit").axes[0].get_xticklabels()]
    assert labels == ["lora", "chameleon", "chameleon\n(prefix)", "lora"]


def test_loss_curves_no_two_curves_share_colour_and_style(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "ROOT", tmp_path)
    conds = ["batch_mean", "task", "task_input", "shuffled", "prefix"]
    history = pd.DataFrame([{"regime": "chameleon", "protocol": "causal", "conditioning": c, "epoch": e,
                             "val_loss": 3.0 - e / 10, "seed": 0} for c in conds for e in (0, 1)])
    fig = plots.loss_curves(history, "unit", "curves")
    styles = {(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in fig.axes[0].get_lines()}
    assert len(styles) == len(conds)
    assert "unit profile" in fig._suptitle.get_text()


def test_committed_figures_are_as_new_as_the_code_that_draws_them():
    """Every committed figures/<profile>/*.png names the plotting function that drew it and the hash
    of that function's code (plots.save); a figure drawn by older code fails here: regenerate it
    (`python -m chameleon notebooks --profile smoke --in-place`, or the notebook on its profile)."""
    from PIL import Image

    from chameleon.config import ROOT

    stale = []
    for png in sorted((ROOT / "figures").glob("*/*.png")):
        meta = Image.open(png).text
        function = meta.get("chameleon-plot")
        if function is None or meta.get("chameleon-plot-hash") != plots.code_hash(function):
            stale.append(f"{png.relative_to(ROOT)} ({function or 'no hash'})")
    assert not stale, "figures older than their plotting code: " + ", ".join(stale)


def test_save_stamps_the_plotting_function_and_its_hash(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    plots.cluster_sizes(np.array([0, 1, 1]), profile="unit")
    meta = Image.open(tmp_path / "figures" / "unit" / "02_cluster_sizes.png").text
    assert meta["chameleon-plot"] == "cluster_sizes"
    assert meta["chameleon-plot-hash"] == plots.code_hash("cluster_sizes") != plots.code_hash("umap_clusters")


def test_outputs_go_under_chameleon_outputs_when_set(tmp_path, monkeypatch):
    from chameleon.config import Config

    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    assert Config.from_profile("smoke").results_dir == tmp_path / "results"
    assert plots.figures_dir("smoke") == tmp_path / "figures" / "smoke"


def test_quiet_leaves_progress_bars_on_for_interactive_use(monkeypatch):
    from chameleon.experiments.notebooks import quiet

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    quiet()
    assert "TQDM_DISABLE" not in os.environ


def test_plots_draw_every_protocol_and_conditioning_of_the_tables(tmp_path, monkeypatch):
    """Every row of regimes.PROTOCOLS and CONDITIONINGS (and the "-" / dispatch labels of regimes
    without a hypernetwork) is drawn with its row's style: panels in PROTOCOLS order."""
    from chameleon.regimes import CONDITIONINGS, NO_CONDITIONING, PROTOCOLS

    monkeypatch.setattr(plots, "ROOT", tmp_path)
    labels = [*CONDITIONINGS, NO_CONDITIONING.name, "dispatch=oracle"]
    rows = [plots.conditioning_row(c) for c in labels]
    assert rows[:len(CONDITIONINGS)] == list(CONDITIONINGS.values()) and set(rows[len(CONDITIONINGS):]) == {NO_CONDITIONING}
    history = pd.DataFrame([{"regime": "chameleon", "protocol": p, "conditioning": c, "epoch": e, "val_loss": 3.0 - e / 10}
                            for p in reversed(PROTOCOLS) for c in labels for e in (0, 1)])
    fig = plots.loss_curves(history, "unit", "curves")
    assert [ax.get_title() for ax in fig.axes] == [f"{p} protocol" for p in PROTOCOLS]
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == len(labels)
        assert [(line.get_marker(), line.get_label()) for line in lines] == [
            (row.marker, plots.run_name("chameleon", c)) for c, row in zip(labels, rows)]
    table = pd.DataFrame([{"regime": "chameleon", "protocol": p, "conditioning": c, "val_loss": 3.0, "val_ppl": 20.0}
                          for p in PROTOCOLS for c in labels])
    fig = plots.results_bars(table, "unit")
    for ax, protocol in zip(fig.axes[::2], PROTOCOLS):
        after = [plots.conditioning_row(c).prefix and PROTOCOLS[protocol].scores == "all" for c in labels]
        drawn = [c for c, a in zip(labels, after) if not a] + [c for c, a in zip(labels, after) if a]
        assert [bar.get_hatch() or "" for bar in ax.patches] == [plots.conditioning_row(c).hatch for c in drawn]


def test_paper_length_stacks_pad_and_real_parts_to_the_loss_and_marks_the_paper(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    table = pd.DataFrame({"regime": ["unadapted", "lora"] * 2, "conditioning": "-", "max_length": [160, 160, 256, 256],
                          "val_loss": [2.98, 0.54, 4.29, 0.002], "val_loss_pad": [2.6, 1e-3, 4.29, 0.002],
                          "val_loss_real": [8.59, 8.6, np.nan, np.nan], "pad_share": [0.9375, 0.9375, 1.0, 1.0]})
    fig = plots.paper_length(table, "unit")
    for ax, part in zip(fig.axes, (table[:2], table[2:])):
        bars = ax.patches
        tops = [bars[i].get_height() + bars[i + len(part)].get_height() for i in range(len(part))]
        assert np.allclose(tops, part["val_loss"], atol=0.01)  # the table above is rounded
        marked = {round(line.get_ydata()[0], 3) for line in ax.get_lines()}
        assert set(plots.PUBLISHED_LOSSES.values()) <= marked


def test_paired_forest_fills_the_intervals_that_exclude_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    paired = pd.DataFrame({"regime": ["chameleon", "lora"], "conditioning": ["batch_mean", "-"], "scored": "all",
                           "reference": "lora_matched", "difference": [-0.09, 0.05], "low": [-0.11, -0.01],
                           "high": [-0.07, 0.11], "significant": [True, False]})
    ax = plots.paired_forest(paired, "unit", "forest", "unit").axes[0]
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [matplotlib.colors.to_hex(p.get_markerfacecolor()) for p in points] == [
        plots.REGIME_COLOURS["chameleon"].lower(), "#ffffff"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["chameleon - lora_matched", "lora - lora_matched"]


def test_svf_comparison_error_bars_show_on_every_bar_and_mark_params_and_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    table = pd.DataFrame({"regime": ["chameleon", "svf_experts"], "protocol": "causal",
                          "conditioning": ["batch_mean", "dispatch=oracle"], "trainable_params": [6603104, 155520],
                          "val_loss": [3.61, 3.43], "val_loss_std": [0.01, 0.005], "passes": [np.nan, 2], "seeds": 3})
    ax = plots.svf_comparison(table, "unit").axes[0]
    bar_colours = {matplotlib.colors.to_hex(b.get_facecolor()) for b in ax.patches}
    error_colours = {matplotlib.colors.to_hex(c) for coll in ax.collections for c in coll.get_colors()}
    assert error_colours and not error_colours & bar_colours  # never the colour of a bar (svf_experts is black)
    texts = [t.get_text() for t in ax.texts]
    assert "6,603,104 params, 1 pass + hypernetwork" in texts[0] and "155,520 params, 2 passes" in texts[1]


def test_umap_colours_by_kind_and_writes_each_cluster_id_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path))
    xy = np.array([[0, 0], [0, 1], [5, 5], [5, 6], [9, 9]], dtype=float)
    kinds = ["heading line", "heading line", "paragraph line", "paragraph line", "paragraph line"]
    ax = plots.umap_clusters(None, [0, 0, 1, 1, 2], "unit", kinds=kinds, xy=xy).axes[0]
    colours = [matplotlib.colors.to_hex(c.get_facecolors()[0][:3]) for c in ax.collections]
    assert colours == [c.lower() for c in plots.KIND_COLOURS[:2]]
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "2"]
