"""Experts regimes (Transformer²'s SVF experts, head-LoRA experts) and the SVF regime beside the others, end to end
on a 2-layer GPT-2 (the smoke profile's data): one experts-and-dispatch component for every expert kind."""
import math
from functools import partial

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import conftest  # pytest puts tests/ on sys.path
from chameleon import training
from chameleon.adapters import svf
from chameleon.backbones import load_backbone
from chameleon.clustering import eval_batches
from chameleon.config import RunFailed
from chameleon.serve.decoding import batched_greedy
from chameleon.adapters.model import build
from chameleon.prepare import prepare
from chameleon.runs import CENTROIDS, CHECKPOINT, load_trained, plan, run_dir, run_name
from chameleon.serve.adapter import Adapter
from chameleon.training import train


# lr well above the profile's: z alone moves a random 2-layer model's loss only a little
tiny = partial(conftest.tiny, epochs=2, lr=0.05, cem_population=4, cem_iters=1, max_train_examples=64,
               max_eval_examples=32)


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
    assert result["passes"] == 1  # the oracle reads the data's groups: no first pass


def test_parameter_counts_follow_n_experts(tmp_path):
    model, _ = load_backbone("gpt2-tiny")
    n = per_expert(model)
    assert n == 2 * (64 + 64)  # 2 blocks x (c_fc, c_proj), min(64, 256) each
    for k in (1, 2, 4):
        assert build(tiny(tmp_path, regime="svf_experts", n_experts=k), model).trainable() == k * n
    assert build(tiny(tmp_path, regime="svf"), model).trainable() == n


def test_lora_experts_count_one_head_lora_per_group(tmp_path):
    model, _ = load_backbone("gpt2-tiny")
    lora = build(tiny(tmp_path, regime="lora"), model).trainable()
    for k in (2, 3):
        result = build(tiny(tmp_path, regime="lora_experts", n_experts=k), model)
        assert result.trainable() == k * lora and result.report()["params_per_expert"] == lora


def test_cem_is_refused_for_experts_that_cannot_be_mixed(tmp_path):
    with pytest.raises(ValueError, match="cannot be mixed.*'oracle', 'classifier'"):
        tiny(tmp_path, regime="lora_experts", dispatch="cem")


def bound(tmp_path, regime="svf_experts", **overrides):
    cfg = tiny(tmp_path, regime=regime, **overrides)
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    train_split, val_split, _ = prepare(cfg, model, tokenizer)
    adapted = build(cfg, model)
    adapted.bind(train_split, val_split)
    return cfg, model, adapted, train_split, val_split


def distinct(experts):
    """Experts that differ, so that the dispatch changes the loss."""
    with torch.no_grad():
        for k, expert in enumerate(experts.experts):
            for p in expert.parameters():
                p.fill_(-2.0 + 2.0 * k if p.dim() == 1 else 0.01 * (k + 1))


@pytest.mark.parametrize("regime, dispatch", [("svf_experts", "oracle"), ("svf_experts", "classifier"),
                                              ("svf_experts", "cem"), ("lora_experts", "oracle"),
                                              ("lora_experts", "classifier")])
def test_every_dispatch_runs_and_oracle_picks_the_true_group(tmp_path, regime, dispatch):
    cfg, model, adapted, train_split, val_split = bound(tmp_path, regime, dispatch=dispatch)
    experts = adapted.experts
    distinct(experts)
    rows = training.scored_rows(adapted, val_split, False, cfg.cache_dir)
    adapted.eval()
    for batch, _ in eval_batches(val_split.labels, cfg.batch_size, cfg.conditioning):
        adapted.route(val_split, batch)
        truth = np.bincount(experts.groups["validation"][batch], minlength=cfg.n_experts).argmax()
        if dispatch == "oracle":
            assert experts.selection == truth
        elif dispatch == "classifier":  # the group whose prompt centroid is nearest the batch's mean prompt
            centroids = torch.stack([train_split.prompt_emb[torch.from_numpy(experts.groups["train"] == g)].mean(0)
                                     for g in range(cfg.n_experts)])
            mean = val_split.prompt_emb[batch].mean(0)
            assert experts.selection == int(((centroids - mean) ** 2).sum(1).argmin())
        else:  # a mixture: K weights in [0, 1]
            assert len(experts.selection) == cfg.n_experts and all(0 <= a <= 1 for a in experts.selection)
    assert math.isfinite(training.evaluate(adapted, val_split, rows, cfg, torch.device("cpu"))["val_loss"])
    # the oracle's groups are the nearest coarse centroids of the examples' own embeddings
    assert set(np.unique(experts.groups["train"])) == set(range(cfg.n_experts))
    assert 0 <= experts.accuracy <= 1


@pytest.mark.parametrize("regime", ["svf_experts", "lora_experts"])
def test_training_routes_each_batch_to_its_majority_group_whatever_the_dispatch(tmp_path, regime):
    cfg, model, adapted, train_split, val_split = bound(tmp_path, regime, dispatch="classifier")
    adapted.train()
    for batch in [[0, 1, 2], list(range(8, 16))]:
        adapted.route(train_split, batch)
        assert adapted.experts.selection == np.bincount(adapted.experts.groups["train"][batch],
                                                        minlength=cfg.n_experts).argmax()


def test_base_weights_are_untouched_and_never_copied(tmp_path):
    cfg = tiny(tmp_path, regime="svf_experts", dispatch="cem", epochs=1)
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    train(plan(cfg)[0], progress=False)  # the oracle run, whose experts the CEM run searches over
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
    assert weights[adapted.svf.keys[name]].shape == model.get_submodule(name).weight.shape


def test_checkpoint_holds_every_expert(tmp_path):
    """One z per expert and adapted matrix (resuming from it: test_training's resume test)."""
    cfg = tiny(tmp_path, regime="svf_experts", epochs=1)
    train(cfg, progress=False)
    with safe_open(run_dir(cfg) / CHECKPOINT, "pt") as f:
        params = [k for k in f.keys() if k.startswith("param.")]
    n_layers = len(svf.target_layers(load_backbone("gpt2-tiny")[0]))
    assert len(params) == cfg.n_experts * n_layers
    assert {p.split(".")[3] for p in params} == {str(k) for k in range(cfg.n_experts)}  # param.svf.experts.<k>.<layer>


@pytest.mark.parametrize("regime", ["svf_experts", "lora_experts"])
def test_other_dispatches_evaluate_the_experts_of_the_oracle_run(tmp_path, monkeypatch, regime):
    """Training routes by the true group whatever the dispatch, so a classifier run is planned after the oracle
    run and evaluates its experts: the same weights, two points of history, its seconds. It never trains the
    oracle run itself: without it, it refuses with a message that names the plan."""
    oracle, classifier = (tiny(tmp_path, regime=regime, dispatch=d) for d in ("oracle", "classifier"))
    assert plan(classifier) == [oracle, classifier] and plan(oracle) == [oracle]
    with pytest.raises(RunFailed, match="not finished: run the plan"):
        train(classifier, progress=False)
    for step in plan(classifier):
        result = train(step, progress=False)
    trained = training.finished(oracle)
    assert result["experts_from"] == run_dir(oracle).name
    assert [h["epoch"] for h in result["history"]] == [0, 2] and result["seconds"] == trained["seconds"]
    assert result["history"][-1]["train_loss"] == trained["history"][-1]["train_loss"]
    with safe_open(run_dir(oracle) / CHECKPOINT, "pt") as a, safe_open(run_dir(classifier) / CHECKPOINT, "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys() if k.startswith("param."))
    # ... and those are the experts the classifier run would have trained itself
    monkeypatch.setattr(training, "trained_by", lambda cfg: None)
    alone = tiny(tmp_path / "alone", regime=regime, dispatch="classifier")
    train(alone, progress=False)
    with safe_open(run_dir(alone) / CHECKPOINT, "pt") as a, safe_open(run_dir(classifier) / CHECKPOINT, "pt") as b:
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6) for k in a.keys() if k.startswith("param."))


@pytest.mark.parametrize("regime", ["svf_experts", "lora_experts"])
def test_served_experts_answer_as_the_evaluation_path_dispatches(tmp_path, regime):
    """A loaded run routes without its data (the prompt centroids are stored with it): each validation batch,
    served as one group, goes to the expert the classifier dispatch picks in evaluation and gets, token for
    token, the answers of decoding the batch after `route`. An oracle run is refused, and served as classifier."""
    oracle, classifier = (tiny(tmp_path, regime=regime, dispatch=d, epochs=1) for d in ("oracle", "classifier"))
    for step in plan(classifier):
        train(step, progress=False)
    assert "prompt_centroids" in load_file(run_dir(classifier) / CENTROIDS)
    with pytest.raises(ValueError, match="dispatch='classifier'"):
        Adapter.from_run(run_dir(oracle)).generate(["Hello there"])
    adapter = Adapter.from_run(run_dir(oracle), dispatch="classifier")
    model, tok = load_backbone(classifier.backbone)
    evaluated = load_trained(classifier, model)  # the evaluation path: bound to its data, routed per batch
    train_split, val_split, _ = prepare(classifier, evaluated.model, tok)
    evaluated.bind(train_split, val_split)
    P = classifier.prefix_tokens
    for batch, _ in eval_batches(val_split.labels, classifier.batch_size, classifier.conditioning)[:3]:
        # the prompt is what the classifier reads in evaluation: the first prefix_tokens tokens of each line
        prompt_ids = [val_split.input_ids[i, :P].tolist() for i in batch]
        prompts = [tok.decode(ids) for ids in prompt_ids]
        assert [tok(p)["input_ids"] for p in prompts] == prompt_ids  # the text encodes back to the same tokens
        served = adapter.generate(prompts, max_new_tokens=4, group="single")
        evaluated.route(val_split, batch)
        assert {r.expert for r in served} == {evaluated.experts.selection}
        assert [r.tokens for r in served] == batched_greedy(evaluated.eval(), prompt_ids, 4, tok.eos_token_id,
                                                            tok.pad_token_id)
    # a mixed batch through Hugging Face's generate (experts per group; SVF decodes group by group) answers alike
    mixed = [tok.decode(val_split.input_ids[i, :P].tolist()) for i in range(12)]
    greedy = adapter.generate(mixed, max_new_tokens=4, group="kmeans", n_groups=3)
    assert [r.tokens for r in adapter.generate(mixed, max_new_tokens=4, group="kmeans", n_groups=3,
                                               do_sample=False)] == [r.tokens for r in greedy]
    assert len({r.expert for r in greedy}) > 1
    if regime == "svf_experts":  # one Hugging Face model holds one body
        with pytest.raises(ValueError, match="use Adapter.generate"):
            adapter.hf_model(mixed, group="kmeans", n_groups=3)


def test_expert_settings_name_only_expert_runs(tmp_path):
    """n_experts / dispatch change the folder of an svf_experts run and of no other regime's."""
    for regime in ("lora", "svf"):
        assert run_name(tiny(tmp_path, regime=regime)) == run_name(tiny(tmp_path, regime=regime, dispatch="cem"))
    a, b = tiny(tmp_path, regime="svf_experts"), tiny(tmp_path, regime="svf_experts", dispatch="classifier")
    assert run_name(a) != run_name(b) and "-classifier-" in run_name(b)


def test_compare_runs_the_svf_rows_beside_the_others(tmp_path):
    from chameleon.experiments.compare import SVF_RUNS, compare

    cfg = tiny(tmp_path, epochs=1)
    assert SVF_RUNS["lm"][0] == ("svf", "batch_mean") and ("svf_experts", "classifier") in SVF_RUNS["lm"]
    table = compare(cfg, runs=[("lora", "batch_mean"), ("svf", "batch_mean"), ("svf_experts", "classifier")],
                    protocols=("causal",), progress=False, stem="svf-seeds1", command="the command")
    assert list(table.conditioning) == ["-", "-", "dispatch=classifier"]
    assert list(table.passes.fillna(1)) == [1, 1, 1]
    markdown = (tmp_path / "results" / "smoke" / "lm" / "svf-seeds1.md").read_text()
    assert markdown.startswith("Produced by `the command`") and "passes" in markdown


def test_svf_parameters_of_gpt2_and_smollm2_layouts():
    from chameleon.adapters.model import svf_parameters

    assert svf_parameters(load_backbone("gpt2-arch")[0]) == 12 * (768 + 768)  # c_fc (768 -> 3072), c_proj


def test_cem_shots_are_held_out_of_training_when_asked(tmp_path, monkeypatch):
    seen = []
    real = training.ClusterBatchSampler

    class Spy(real):
        def __iter__(self):
            for batch in super().__iter__():
                seen.extend(batch)
                yield batch

    monkeypatch.setattr(training, "ClusterBatchSampler", Spy)
    captured = {}
    monkeypatch.setattr(training.Adapted, "held_out", lambda self: captured.setdefault("ids", type(self.svf).held_out(self.svf)))
    train(tiny(tmp_path, regime="svf_experts", epochs=1, cem_held_out=True), progress=False)
    shots = captured["ids"]
    assert len(shots) == 3 * 4 and not set(shots) & set(seen)  # cem_shots per group
    assert len(seen) == 64 - len(shots)  # every other train example once
