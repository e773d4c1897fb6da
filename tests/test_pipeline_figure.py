"""Notebook 01's drawing of the method (chameleon/experiments/pipeline_figure.py): the committed
figures/pipeline.png is as new as the code that draws it, and the drawing quotes no measured number."""
import re

from PIL import Image

from chameleon.config import ROOT
from chameleon.experiments import pipeline_figure


def test_committed_pipeline_figure_is_as_new_as_its_code():
    meta = Image.open(ROOT / "figures" / "pipeline.png").text
    assert meta.get("chameleon-plot-hash") == pipeline_figure.code_hash(), (
        "figures/pipeline.png is older than chameleon/experiments/pipeline_figure.py: re-run notebook 01 "
        "(`python -m chameleon notebooks --profile smoke --in-place --only 01`)")


def test_pipeline_figure_draws_the_steps_and_no_measured_number():
    fig = pipeline_figure.draw()
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for step in ("mean token embedding", "k-means", "one-cluster batches", "hypernetwork", "LM head", "authors", "causal"):
        assert step in text
    assert not re.findall(r"\d+\.\d+|\d+\s?%", text)  # a drawing of the method, not of a result
