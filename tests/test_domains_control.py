"""The second domains experiment's parts: the standardized conditioning (stored with the run, applied when served),
the positive control's codes and their permutation, prefix routing, the dev split by group, the widening rate grid,
the dev stage and the runs end to end on the tiny GPT-2, and the fixed sequence's verdicts against slow loops."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import conftest
from chameleon import data
from chameleon.experiments import domains, domains_control as dc
from chameleon.clustering import assign
from chameleon.adapters.hypernetwork import ChameleonHead
from chameleon.prepare import domain_codes, pooled, prepare
from chameleon.regimes import BATCHINGS
from chameleon.runs import load_trained, read_centroids, run_dir, trained_by
from chameleon.training import train

tiny = conftest.tiny_domains


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three clearly distinct domains."""
    return conftest.labelled_corpus(tmp_path_factory.mktemp("corpus"), ("prose", "code", "chat"), per_domain=70)


def test_standardize_centres_and_scales_what_the_hypernetwork_reads():
    torch.manual_seed(0)
    head = ChameleonHead(torch.nn.Linear(8, 20, bias=False), d_cond=6, rank=2, alpha=1.0, flavour="authors",
                         hidden=(5,), dropout=0.0)
    vectors = torch.randn(50, 6) * torch.tensor([0.01, 0.1, 1, 2, 3, 4]) + 7
    cond = vectors[:3].mean(0)
    plain = head.generate_adapter(cond)
    head.standardize(vectors)
    expected = head.hyper((cond - vectors.mean(0)) / (vectors.std(0) + 1e-6))
    for got, want, before in zip(head.generate_adapter(cond), expected, plain):
        assert torch.allclose(got, want) and not torch.allclose(got, before)
    hidden = torch.randn(4, 8)
    A, B = expected
    assert torch.allclose(head(hidden, cond), head.base(hidden) + head.scaling * hidden @ A.T @ B.T, atol=1e-6)


def test_a_standardized_run_stores_its_statistics_and_serving_applies_them(tmp_path, labelled):
    cfg = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="prefix", cond_norm="standardize")
    train(cfg, progress=False)
    from chameleon.backbones import load_backbone

    model, tokenizer = load_backbone(cfg.backbone)
    train_split, _, _ = prepare(cfg, model, tokenizer)
    stored = read_centroids(run_dir(cfg))
    assert torch.allclose(stored["cond_shift"], train_split.cond_own.mean(0))
    assert torch.allclose(stored["cond_scale"], train_split.cond_own.std(0) + 1e-6)
    loaded = load_trained(cfg, load_backbone(cfg.backbone)[0])
    assert torch.equal(loaded.head.cond_shift, stored["cond_shift"])
    # the paper's recipe stores nothing new: older runs' folders stay as they were
    plain = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="prefix")
    train(plain, progress=False)
    assert "cond_shift" not in read_centroids(run_dir(plain)) and run_dir(plain).name != run_dir(cfg).name


def test_codes_are_fixed_per_domain_and_permuted_only_at_inference():
    g = torch.Generator().manual_seed(1)
    train_emb = torch.randn(30, 4, generator=g) * torch.tensor([0.1, 1, 2, 3]) + 5
    doms, vdoms = np.array(list("abc") * 10), np.array(list("cbaab"))
    codes = domain_codes(train_emb, 3)
    assert torch.allclose(codes, domain_codes(train_emb[torch.randperm(30)], 3))  # a property of the data alone
    standardized = (codes - train_emb.mean(0)) / train_emb.std(0)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(20260), dtype=torch.float64).float()
    assert torch.allclose(standardized, noise, atol=1e-4)  # codes are as spread as single lines, in their units
    own = pooled(train_emb, doms, train_emb[:5], vdoms, "code", "validation")
    assert all(torch.equal(own[i], codes["abc".index(d)]) for i, d in enumerate(vdoms))
    permuted = pooled(train_emb, doms, train_emb[:5], vdoms, "code_permuted", "validation")
    assert all(torch.equal(permuted[i], codes[("abc".index(d) + 1) % 3]) for i, d in enumerate(vdoms))
    assert torch.equal(pooled(train_emb, doms, train_emb[:5], vdoms, "code_permuted", "train"), own)


def test_the_permuted_row_evaluates_the_separable_rows_weights(tmp_path, labelled):
    cfg = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="oracle_permuted", lr=1e-2)
    source = trained_by(cfg)
    assert source.conditioning == "oracle_separable"
    with pytest.raises(Exception, match="not finished"):
        train(cfg, progress=False)
    train(source, progress=False)
    result = train(cfg, progress=False)
    assert result["history"][-1]["step"] == json.loads((run_dir(source) / "metrics.json").read_text())["history"][-1]["step"]
    own, swapped = (pd.read_csv(run_dir(c) / "lines.csv") for c in (source, cfg))
    assert not np.allclose(own.loss_clustered, swapped.loss_clustered)


def test_prefix_routing_reads_only_the_prefix(tmp_path, labelled, gpt2_tiny):
    model, tokenizer = gpt2_tiny
    cfg = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="constant", route_by="prefix")
    full = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="constant")
    tr, val, centroids = prepare(cfg, model, tokenizer)
    _, val_full, _ = prepare(full, model, tokenizer)
    prefix = prepare(cfg.replace(conditioning="prefix"), model, tokenizer)
    p_train, p_val = prefix[0].cond_own, prefix[1].cond_own  # the prefix row's own vectors: the first 4 tokens
    means = np.stack([p_train[torch.from_numpy(tr.labels == c)].mean(0).numpy() for c in range(len(centroids))])
    assert np.allclose(centroids, means, atol=1e-6)
    assert (val.labels == assign(p_val, means)).all() and torch.equal(val.group_emb, p_val)
    assert not torch.equal(val_full.group_emb, p_val)  # the paper's way groups by the whole line


def test_dev_split_by_group_keeps_every_source_on_one_side():
    corpus = data.load_lm_corpus("domains")["train"]
    train_part, dev = (data.carve_dev(corpus, s, "group") for s in ("train", "validation"))
    assert not set(train_part["group"]) & set(dev["group"]) and 0.05 < len(dev) / len(corpus) < 0.3
    with pytest.raises(ValueError, match="dev_key='text'"):
        data.carve_dev(corpus.remove_columns("group"), "train", "group")


def test_the_grid_widens_past_an_edge_until_the_best_rate_is_inside(tmp_path, monkeypatch):
    from chameleon import training

    losses = {3e-5: 2.9, 1e-5: 2.95}  # below the grid the loss turns up again

    def fake_train(cfg, progress=True, resume=False):
        return {"val_loss": losses.get(cfg.lr, 3.0 + cfg.lr), "history": []}

    monkeypatch.setattr(training, "train", fake_train)
    cfg = tiny(tmp_path)
    path = tmp_path / "grid.csv"
    grid = dc.sweep(cfg, dc.ROWS["lora"], dc.NO_RECIPE, pd.DataFrame(columns=["row", "recipe", "lr", "dev_loss", "status"]),
                    path, progress=False)
    assert sorted(grid.lr) == sorted([*dc.LR_GRID, 3e-5, 1e-5]) and dc.chosen_rate(grid, "lora", "-") == 3e-5
    assert dc.edge(grid, "lora", "-") == 0 and pd.read_csv(path).equals(grid)


def _lines(effects: dict[str, float], seeds: int = 5, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(2, 4, n)
    frames = []
    for row, effect in effects.items():
        for s in range(seeds):
            loss = (base + effect + rng.normal(0, 0.002, n)) * 10
            frames.append(pd.DataFrame({"line": range(n), "tokens": 10, "domain": "a", "row": row, "seed": s,
                                        **{f"loss_{b}": loss for b in BATCHINGS}}))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("separable, prefix, verdict", [(-0.001, -0.05, "(a)"), (-0.05, 0.0, "(b)"),
                                                        (-0.05, -0.03, "(c)")])
def test_the_fixed_sequence_gives_each_of_the_three_answers(separable, prefix, verdict):
    lines = _lines({"chameleon_constant": 0.0, "chameleon_oracle_separable": separable, "chameleon_prefix": prefix})
    v = dc.verdicts(lines)
    said = dc.answer(v, dev_passed=True)
    assert said.startswith(f"**{verdict}")
    p = v["primary"]
    slow = [lines[(lines.row == "chameleon_prefix") & (lines.seed == s)].loss_kmeans.sum() / 600
            - lines[(lines.row == "chameleon_constant") & (lines.seed == s)].loss_kmeans.sum() / 600 for s in range(5)]
    half = stats.t.ppf(0.95, 4) * np.std(slow, ddof=1) / math.sqrt(5)
    assert (p["tost_low"], p["tost_high"]) == pytest.approx((np.mean(slow) - half, np.mean(slow) + half))
    assert fmt_in(said, p["difference"]) and fmt_in(said, v["control"]["difference"])
    if verdict == "(b)":
        assert p["equivalent"] and f"{-p['t_low']:.3f} nats" in said


@pytest.mark.parametrize("permuted, reads", [(0.02, True), (0.0, False)])
def test_a_failed_control_says_whether_the_head_reads_its_codes(permuted, reads):
    """Beside answer (a), the negative check decides the described sentence: permuted codes costing more than the
    right ones (seed interval above 0) mean the head reads them; otherwise nothing is said."""
    lines = _lines({"chameleon_constant": 0.0, "chameleon_oracle_separable": 0.01, "chameleon_prefix": 0.0,
                    "chameleon_oracle_permuted": 0.01 + permuted})
    said = dc.answer(dc.verdicts(lines), dev_passed=True)
    assert said.startswith("**(a)") and ("not blind to its input" in said) == reads
    if reads:
        assert fmt_in(said, permuted)


def fmt_in(text: str, x: float) -> bool:
    return domains.fmt(x) in text


def test_the_dev_stage_and_the_runs_end_to_end(tmp_path, labelled, monkeypatch):
    """tune (one recipe, one rate, its control, a 2-epoch history) -> run_seeds -> results_text on the tiny GPT-2:
    the chosen settings reach every run, and a rerun trains nothing again."""
    monkeypatch.setattr(dc, "ROWS", {k: dc.ROWS[k] for k in ("chameleon_prefix", "chameleon_constant",
                                                             "chameleon_oracle_separable")})
    monkeypatch.setattr(dc, "RECIPES", {"standardize_no_dropout": dc.RECIPES["standardize_no_dropout"]})
    monkeypatch.setattr(dc, "LR_GRID", (1e-2,))
    monkeypatch.setattr(dc, "MAX_EPOCHS", 2)
    monkeypatch.setattr(dc, "corpus_table", lambda cfg: pd.DataFrame({"split": ["train"]}))
    cfg = tiny(tmp_path, corpus=labelled, route_by="prefix", max_train_examples=32)
    recipes = dc.tune(cfg, progress=False)
    assert list(recipes.recipe) == ["standardize_no_dropout"]
    out = domains.folder(cfg)
    epochs = pd.read_csv(out / "epochs.csv")
    assert list(set(epochs.row)) == ["chameleon_prefix"] and list(epochs.epoch) == [1, 2]
    chosen = dc.settings(out)
    assert chosen["chameleon_oracle_separable"] == chosen["chameleon_prefix"] == dict(
        lr=1e-2, epochs=dc.chosen_epochs(epochs, "chameleon_prefix"), **dc.RECIPES["standardize_no_dropout"])
    runs = dc.run_seeds(cfg, seeds=2, progress=False)
    assert len(runs) == 2 * len(dc.ROWS)
    assert (runs[runs.row == "chameleon_constant"].epochs == chosen["chameleon_prefix"]["epochs"]).all()
    text = dc.results_text(out)
    assert "## Answer" in text and dc.run_seeds(cfg, seeds=2, progress=False).equals(runs)


def test_update_spread_and_geometry_against_slow_loops():
    torch.manual_seed(0)
    head = ChameleonHead(torch.nn.Linear(8, 20, bias=False), d_cond=6, rank=2, alpha=1.0, flavour="authors",
                         hidden=(5,), dropout=0.0).eval()
    hidden, conds = torch.randn(7, 8), torch.randn(4, 6)
    full = []
    for c in conds:  # the update as a whole matrix, one input at a time
        A, B = head.generate_adapter(c)
        full.append(hidden @ (head.scaling * B @ A).T)
    full = torch.stack(full)
    slow = (full - full.mean(0)).flatten(1).norm(dim=1).square().mean().sqrt() / full.mean(0).norm()
    assert dc.update_spread(head, hidden, conds) == pytest.approx(float(slow), rel=1e-5)
    assert dc.update_spread(head, hidden, conds[:1].expand(3, 6)) == pytest.approx(0, abs=1e-6)
    x = torch.randn(60, 3) + torch.tensor([5.0, 0, 0])  # a large common component, domains apart on dimension 1
    doms = np.array(list("ab") * 30)
    x[doms == "a", 1] += 8
    g = dc.geometry(x, doms, x, doms)
    a, b = x[doms == "a"].mean(0), x[doms == "b"].mean(0)
    assert g["domain_cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), rel=1e-5)
    assert g["common_share"] == pytest.approx(float(x.mean(0).square().sum() / x.square().sum(1).mean()), rel=1e-5)
    assert g["probe_accuracy"] == 1.0
