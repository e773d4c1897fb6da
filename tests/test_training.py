"""The method end to end on a 2-layer GPT-2 with GPT-2's real tokenizer (the smoke profile's data)."""
import math
from functools import partial

import pytest

from chameleon import objectives, training
from chameleon.__main__ import main
from chameleon.experiments.compare import PAPER_TABLE
from chameleon.backbones import load_backbone
from chameleon.adapters.model import Adapted
from chameleon.regimes import REGIMES
from chameleon.runs import run_dir
from chameleon.training import TrainingDiverged, train

import conftest

tiny = partial(conftest.tiny, epochs=2)  # two epochs: a loss falls from the first to the last


def test_params_prints_the_papers_three_numbers(capsys):
    assert main(["params", "--model", "gpt2-arch", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    for regime, count in [("unadapted", 124_439_808), ("lora", 204_100), ("chameleon", 6_786_596)]:
        assert PAPER_TABLE.set_index("regime").trainable_params[regime] == count  # the table we print beside ours
        assert any(line.split() == [regime, f"{count:,}"] for line in out.splitlines()), out


@pytest.mark.parametrize("protocol", ["authors", "causal"])
# the SVF regimes train through the body on their own schedule: tests/test_svf_regimes.py checks their loss falls
@pytest.mark.parametrize("regime", [r for r, regime in REGIMES.items() if regime.blocks != "svf"])
def test_every_regime_trains_and_its_loss_falls(tmp_path, regime, protocol):
    # the smoke profile's lr (2e-3) moves a random 2-layer model's causal loss by ~0.001 in its 8 steps: within what
    # one epoch's order changes; 1e-2 moves every regime's by 0.01 or more
    result = train(tiny(tmp_path, regime=regime, protocol=protocol, lr=1e-2), progress=False)
    history = result["history"]
    assert all(math.isfinite(h["val_loss"]) for h in history)
    if regime == "unadapted":
        total = sum(p.numel() for p in load_backbone("gpt2-tiny")[0].parameters())
        assert len(history) == 1 and result["trainable_params"] == total
        return
    assert len(history) == 3  # before training, then once per epoch
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    if protocol == "causal":  # under "authors" validation scores only 32 last positions: too few to rank
        assert history[-1]["val_loss"] < history[0]["val_loss"]


@pytest.mark.parametrize("regime", ["lora", "chameleon"])
def test_cached_body_gives_the_same_losses_as_the_full_path(tmp_path, regime):
    cached = train(tiny(tmp_path, regime=regime, epochs=2), progress=False)
    full = train(tiny(tmp_path, regime=regime, epochs=2, cache_body=False), progress=False)
    for a, b in zip(cached["history"], full["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


@pytest.mark.parametrize("regime", ["lora", "chameleon"])
def test_the_chunked_loss_trains_as_the_full_logits_did(tmp_path, regime, monkeypatch):
    fused = train(tiny(tmp_path, regime=regime, epochs=2), progress=False)

    def plain(self, hidden, target, cond=None, owner=None):  # the loss before chameleon.fused_loss: full logits
        return objectives.loss_sum(self.logits(hidden, cond), target)

    monkeypatch.setattr(Adapted, "loss_sum", plain)
    before = train(tiny(tmp_path, regime=regime, epochs=2).replace(results_dir=tmp_path / "plain"), progress=False)
    for a, b in zip(fused["history"], before["history"], strict=True):
        assert a.keys() == b.keys()
        for key in ("train_loss", "val_loss"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)


def test_a_finished_run_is_read_back_not_retrained(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, regime="lora", epochs=1)
    first = train(cfg, progress=False)
    monkeypatch.setattr(training, "prepare", lambda *a: pytest.fail("retrained a finished run"))
    assert train(cfg, progress=False) == first


@pytest.mark.parametrize("regime", ["chameleon", "svf_experts"])  # a hypernetwork; one z per expert and matrix
def test_resume_reaches_the_same_final_numbers(tmp_path, monkeypatch, regime):
    reference = train(tiny(tmp_path / "a", regime=regime, epochs=3), progress=False)
    cfg = tiny(tmp_path / "b", regime=regime, epochs=3)
    calls, evaluate = [], training.evaluate

    def interrupted(*args):  # dies in the evaluation after epoch 2, once epoch 1 is checkpointed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(training, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.setattr(training, "evaluate", evaluate)
    resumed = train(cfg, resume=True, progress=False)
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx(
        [h["val_loss"] for h in reference["history"]], abs=1e-6)


def test_nan_loss_stops_with_the_step_named_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, regime="lora", epochs=2)
    saved, save, loss_sum = [], training.save_checkpoint, Adapted.loss_sum

    def saving(*args):  # the loss turns NaN once epoch 1 is checkpointed
        save(*args)
        saved.append(1)

    monkeypatch.setattr(training, "save_checkpoint", saving)
    monkeypatch.setattr(Adapted, "loss_sum", lambda self, *args: loss_sum(self, *args) * (math.nan if saved else 1.0))
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+ .*; the last good checkpoint is in "):
        train(cfg, progress=False)
    assert (run_dir(cfg) / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=1000), "batch_size=1000 exceeds"),
    (dict(n_clusters=1000), "k=1000 exceeds"),
])
def test_bad_sizes_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(tmp_path, **overrides), progress=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(conditioning="task"), "conditioning='task' is not valid here"),
    (dict(regime="adapter"), "regime='adapter' is not valid here"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **overrides)


def test_cli_train_writes_its_results_folder(tmp_path, capsys):
    args = ["train", "--profile", "smoke", "--backbone", "gpt2-tiny", "--regime", "chameleon", "--protocol", "causal",
            "--epochs", "1", "--max-train-examples", "32", "--max-eval-examples", "16",
            "--data-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")]
    cfg = tiny(tmp_path, regime="chameleon", protocol="causal", epochs=1)
    out = run_dir(cfg)
    assert main(args) == 0
    assert (out / "metrics.json").exists() and (out / "metrics.csv").exists()
    assert "val perplexity" in capsys.readouterr().out


def test_progress_bars_obey_the_argument_and_tqdm_disable(monkeypatch):
    """progress=False silences a bar; progress=True shows one unless TQDM_DISABLE is set, which tqdm's notebook
    bars alone would ignore (make test and make notebooks-smoke set it: no widgets in the notebooks' outputs)."""
    from tqdm.notebook import tqdm_notebook

    from chameleon.training import progress_bar

    monkeypatch.setattr(training, "tqdm", tqdm_notebook)  # what tqdm.auto gives inside a Jupyter kernel
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3), True).disable and progress_bar(range(3), False).disable
    monkeypatch.delenv("TQDM_DISABLE")
    assert progress_bar(range(3), False).disable and not progress_bar(range(3), True).disable
