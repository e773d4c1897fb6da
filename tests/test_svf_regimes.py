"""The SVF regimes (Transformer²) beside the others, end to end on a 2-layer GPT-2 (the smoke profile's data)."""
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from chameleon import Config, svf, training
from chameleon.backbones import load_backbone
from chameleon.clustering import eval_batches
from chameleon.model import build
from chameleon.prepare import prepare
from chameleon.runs import CHECKPOINT, run_dir, run_name
from chameleon.training import train


def tiny(tmp_path, **overrides) -> Config:
    # lr well above the profile's: z alone moves a random 2-layer model's loss only a little
    return Config.from_profile("smoke", backbone="gpt2-tiny", data_dir=tmp_path, results_dir=tmp_path / "results",
                               **{"epochs": 2, "lr": 0.05, "cem_population": 4, "cem_iters": 1, **overrides})


def per_expert(model) -> int:
    return sum(min(svf.matrix(layer).shape) for layer in svf.target_layers(model, "mlp").values())


@pytest.mark.parametrize("protocol", ["authors", "causal"])
@pytest.mark.parametrize("regime", ["svf", "svf_experts"])
def test_svf_regimes_train_and_their_loss_falls(tmp_path, regime, protocol):
    result = train(tiny(tmp_path, regime=regime, protocol=protocol), progress=False)
    history = result["history"]
    assert all(math.isfinite(h["val_loss"]) for h in history) and len(history) == 3
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    n = per_expert(load_backbone("gpt2-tiny")[0])
    k = 3 if regime == "svf_experts" else 1
    assert result["params_per_expert"] == n and result["trainable_params"] == k * n
    assert result["passes"] == (2 if regime == "svf_experts" else 1)


def test_parameter_counts_follow_n_experts(tmp_path):
    model, _ = load_backbone("gpt2-tiny")
    n = per_expert(model)
    assert n == 2 * (64 + 64)  # 2 blocks x (c_fc, c_proj), min(64, 256) each
    for k in (1, 2, 4):
        assert build(tiny(tmp_path, regime="svf_experts", n_experts=k), model).trainable() == k * n
    assert build(tiny(tmp_path, regime="svf"), model).trainable() == n


def bound(tmp_path, **overrides):
    cfg = tiny(tmp_path, regime="svf_experts", **overrides)
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    train_split, val_split, _ = prepare(cfg, model, tokenizer)
    adapted = build(cfg, model)
    adapted.bind(train_split, val_split)
    return cfg, model, adapted, train_split, val_split


@pytest.mark.parametrize("dispatch", ["oracle", "classifier", "cem"])
def test_every_dispatch_runs_and_oracle_picks_the_true_group(tmp_path, dispatch):
    cfg, model, adapted, train_split, val_split = bound(tmp_path, dispatch=dispatch)
    experts = adapted.svf
    with torch.no_grad():  # distinct experts, so that the dispatch changes the loss
        for k in range(cfg.n_experts):
            for z in experts.expert(k).values():
                z.fill_(-2.0 + 2.0 * k)
    rows = training.scored_rows(adapted, val_split, False, cfg.cache_dir)
    adapted.eval()
    for batch, _ in eval_batches(val_split.labels, cfg.batch_size, cfg.conditioning):
        adapted.route(val_split, batch)
        truth = np.bincount(experts.groups["validation"][batch], minlength=cfg.n_experts).argmax()
        if dispatch == "oracle":
            assert experts.selection == truth
        elif dispatch == "classifier":
            assert experts.selection == experts.classify(batch)
        else:  # a mixture: K weights in [0, 1]
            assert len(experts.selection) == cfg.n_experts and all(0 <= a <= 1 for a in experts.selection)
    assert math.isfinite(training.evaluate(adapted, val_split, rows, cfg, torch.device("cpu"))["val_loss"])
    # the oracle's groups are the nearest coarse centroids of the examples' own embeddings
    assert set(np.unique(experts.groups["train"])) == set(range(cfg.n_experts))
    assert 0 <= experts.accuracy <= 1


def test_training_routes_each_batch_to_its_majority_group(tmp_path, monkeypatch):
    cfg, model, adapted, train_split, val_split = bound(tmp_path)
    seen = []
    adapted.train()
    for batch in [[0, 1, 2], list(range(8, 16))]:
        adapted.route(train_split, batch)
        seen.append(adapted.svf.selection)
        assert seen[-1] == np.bincount(adapted.svf.groups["train"][batch], minlength=cfg.n_experts).argmax()


def test_base_weights_are_untouched_and_never_copied(tmp_path):
    cfg = tiny(tmp_path, regime="svf_experts", dispatch="cem", epochs=1)
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    train(cfg, model=model, tokenizer=tokenizer, progress=False)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, value) in before.items():
        assert after[n] is p and torch.equal(p, value), n


def test_expert_weights_match_the_svf_adapter(tmp_path):
    """W' that the body runs with is svf.SVFMatrix.weight of the selected z, in Conv1D's (in, out) layout."""
    cfg, model, adapted, _, _ = bound(tmp_path)
    adapted.eval()
    adapted.svf.selection = 1
    weights = adapted.svf.weights()
    name = adapted.svf.names[0]
    expected = adapted.svf.svf.weight(name, adapted.svf.expert(1)[name]).T
    assert torch.allclose(weights[adapted.svf.keys[name]], expected)
    assert weights[adapted.svf.keys[name]].shape == svf.original_weight(model.get_submodule(name)).shape


def test_checkpoint_holds_every_expert(tmp_path):
    """One z per expert and adapted matrix (resuming from it: test_training's resume test)."""
    cfg = tiny(tmp_path, regime="svf_experts", epochs=1)
    train(cfg, progress=False)
    with safe_open(run_dir(cfg) / CHECKPOINT, "pt") as f:
        params = [k for k in f.keys() if k.startswith("param.")]
    n_layers = len(svf.target_layers(load_backbone("gpt2-tiny")[0]))
    assert len(params) == cfg.n_experts * n_layers
    assert {p.split(".")[3] for p in params} == {str(k) for k in range(cfg.n_experts)}  # param.svf.experts.<k>.<layer>


def test_other_dispatches_evaluate_the_experts_of_the_oracle_run(tmp_path, monkeypatch):
    """Training routes by the true group whatever the dispatch, so a classifier run trains the oracle run
    first (if missing) and evaluates its experts: the same weights, two passes of history, its seconds."""
    oracle, classifier = (tiny(tmp_path, regime="svf_experts", dispatch=d) for d in ("oracle", "classifier"))
    result = train(classifier, progress=False)
    trained = training.finished(oracle)
    assert trained is not None and result["experts_from"] == run_dir(oracle).name
    assert [h["epoch"] for h in result["history"]] == [0, 2] and result["seconds"] == trained["seconds"]
    assert result["history"][-1]["train_loss"] == trained["history"][-1]["train_loss"]
    with safe_open(run_dir(oracle) / CHECKPOINT, "pt") as a, safe_open(run_dir(classifier) / CHECKPOINT, "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys() if k.startswith("param."))
    # ... and those are the experts the classifier run would have trained itself
    monkeypatch.setattr(training, "_experts_run", lambda cfg, progress: None)
    alone = tiny(tmp_path / "alone", regime="svf_experts", dispatch="classifier")
    train(alone, progress=False)
    with safe_open(run_dir(alone) / CHECKPOINT, "pt") as a, safe_open(run_dir(classifier) / CHECKPOINT, "pt") as b:
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6) for k in a.keys() if k.startswith("param."))


def test_expert_settings_name_only_expert_runs(tmp_path):
    """n_experts / dispatch change the folder of an svf_experts run and of no other regime's."""
    for regime in ("lora", "svf"):
        assert run_name(tiny(tmp_path, regime=regime)) == run_name(tiny(tmp_path, regime=regime, dispatch="cem"))
    a, b = tiny(tmp_path, regime="svf_experts"), tiny(tmp_path, regime="svf_experts", dispatch="classifier")
    assert run_name(a) != run_name(b) and "-classifier-" in run_name(b)


def test_compare_runs_the_svf_rows_beside_the_others(tmp_path):
    from chameleon.compare import SVF_RUNS, compare

    cfg = tiny(tmp_path, epochs=1)
    assert SVF_RUNS["lm"][0] == ("svf", "batch_mean") and ("svf_experts", "classifier") in SVF_RUNS["lm"]
    table = compare(cfg, runs=[("lora", "batch_mean"), ("svf", "batch_mean"), ("svf_experts", "classifier")],
                    protocols=("causal",), progress=False, stem="svf-seeds1", command="the command")
    assert list(table.conditioning) == ["-", "-", "dispatch=classifier"]
    assert list(table.passes.fillna(1)) == [1, 1, 2]
    markdown = (tmp_path / "results" / "smoke" / "lm" / "svf-seeds1.md").read_text()
    assert markdown.startswith("Produced by `the command`") and "passes" in markdown


def test_svf_parameters_of_gpt2_and_smollm2_layouts():
    from chameleon.model import svf_parameters

    assert svf_parameters(load_backbone("gpt2-arch")[0]) == 12 * (768 + 768)  # c_fc (768 -> 3072), c_proj
