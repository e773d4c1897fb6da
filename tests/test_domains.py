"""The `domains` experiment's parts: the labelled corpus, the dev split, the pooled conditionings (constant,
oracle), the inference batchings, per-line losses, per-domain experts, lora_matched's scaling, and the
analysis (paired intervals, bootstrap, Holm) against slow explicit computations."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import conftest
from chameleon import data
from chameleon.experiments import domains
from chameleon.experiments.stats import paired
from chameleon.clustering import incoming_batches
from chameleon.adapters.lora import scaling
from chameleon.adapters.model import build
from chameleon.prepare import Split, pooled
from chameleon.regimes import BATCHINGS
from chameleon.runs import LINES, run_dir
from chameleon.training import train

DOMAINS = ["code", "dialogue_en", "dialogue_es", "dialogue_it", "dialogue_pt", "encyclopedia"]


@pytest.fixture(scope="module")
def corpus():
    return data.load_lm_corpus("domains")


def test_domains_corpus_is_labelled_balanced_and_split_by_source(corpus):
    for split in data.SPLITS:
        assert sorted(set(corpus[split]["domain"])) == DOMAINS
    counts = pd.Series([d for s in data.SPLITS for d in corpus[s]["domain"]]).value_counts()
    assert counts.max() <= data.PER_DOMAIN and counts.min() >= 200
    texts = {s: set(corpus[s]["text"]) for s in data.SPLITS}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    # a source file's blocks all land in one split (a text found in several files is kept from the first)
    split_of = {t: s for s, ts in texts.items() for t in ts}
    first = {}
    for block in data._code_blocks():
        first.setdefault(block["text"], block["key"])
    files = {}
    for text, key in first.items():
        if text in split_of:
            files.setdefault(key, set()).add(split_of[text])
    assert len(files) > 20 and all(len(splits) == 1 for splits in files.values())


def test_local_jsonl_keeps_its_domain_column(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line number {i} of the corpus", "domain": "ab"[i % 2]})
                              for i in range(200)))
    ds = data.load_lm_corpus(str(path))
    assert set(ds["train"]["domain"]) == {"a", "b"}
    assert all(int(t.split()[2]) % 2 == "ab".index(d) for t, d in zip(ds["train"]["text"], ds["train"]["domain"]))


def test_dev_split_is_carved_from_train_only(corpus):
    train, dev = data.carve_dev(corpus["train"], "train"), data.carve_dev(corpus["train"], "validation")
    assert sorted(list(train["text"]) + list(dev["text"])) == sorted(corpus["train"]["text"])
    assert 0.08 < len(dev) / len(corpus["train"]) < 0.22 and not set(dev["text"]) & set(corpus["validation"]["text"])


def test_pooled_conditionings():
    train, val = torch.randn(6, 3), torch.randn(4, 3)
    doms, vdoms = np.array(list("aabbbc")), np.array(list("cbaa"))
    assert torch.equal(pooled(train, doms, val, vdoms, "example"), val)
    assert torch.allclose(pooled(train, doms, val, vdoms, "all"), train.mean(0).expand(4, 3))
    oracle = pooled(train, doms, val, vdoms, "domain")
    for row, d in zip(oracle, vdoms):
        assert torch.allclose(row, train[torch.from_numpy(doms == d)].mean(0))
    with pytest.raises(ValueError, match="domain"):
        pooled(train, None, val, None, "domain")


def _split(n=40, d=3):
    g = torch.Generator().manual_seed(0)
    return Split(name="validation", texts=[""] * n, input_ids=torch.zeros(n, 2), attention=torch.zeros(n, 2),
                 targets=torch.zeros(n, 2), cluster_emb=torch.randn(n, d, generator=g), cond_emb=torch.randn(n, d),
                 labels=np.arange(n) % 5, group_emb=torch.randn(n, d, generator=g))


@pytest.mark.parametrize("batching", list(BATCHINGS))
def test_every_batching_scores_every_line_once(batching):
    split = _split()
    batches = incoming_batches(split, 4, "batch_mean", batching)
    members = sorted(i for b, _ in batches for i in b)
    assert members == list(range(len(split)))
    assert all(b == c for b, c in batches)  # own-batch conditioning
    if batching == "mixed":
        assert {len(b) for b, _ in batches} == {4}
    if batching == "clustered":
        assert all(len(set(split.labels[b])) == 1 for b, _ in batches)


def test_shuffled_conditions_on_another_batch_under_every_batching():
    for batching in BATCHINGS:
        batches = incoming_batches(_split(), 4, "shuffled", batching)
        assert any(b != c for b, c in batches)


tiny = conftest.tiny_domains


@pytest.mark.parametrize("overrides", [dict(regime="chameleon", conditioning="oracle"),
                                       dict(regime="lora_experts", expert_groups="domain", n_experts=2)])
def test_line_losses_add_up_to_the_val_loss(tmp_path, labelled, overrides):
    cfg = tiny(tmp_path, corpus=labelled, **overrides)
    result = train(cfg, progress=False)
    lines = pd.read_csv(run_dir(cfg) / LINES)
    assert set(lines.domain) == {"prose", "code"} and len(lines) == len(set(lines.line))
    # the clustered batching is the one every epoch's evaluation uses
    assert lines.loss_clustered.sum() / lines.tokens.sum() == pytest.approx(result["val_loss"], rel=1e-5)
    for b in BATCHINGS:
        assert result["batchings"][b] == pytest.approx(lines[f"loss_{b}"].sum() / lines.tokens.sum(), rel=1e-9)


def test_domain_experts_need_as_many_experts_as_domains(tmp_path, labelled):
    with pytest.raises(ValueError, match="--n-experts 2"):
        train(tiny(tmp_path, corpus=labelled, regime="lora_experts", expert_groups="domain", n_experts=3),
              progress=False)


def test_oracle_conditioning_needs_a_labelled_corpus(tmp_path):
    with pytest.raises(ValueError, match="domain"):
        train(tiny(tmp_path, regime="chameleon", conditioning="oracle"), progress=False)


def test_scaled_lora_matched_takes_the_rank_r_scaling(tmp_path, gpt2_tiny):
    model, _ = gpt2_tiny
    for alpha_rule, expected in (("scaled", scaling("standard", 1.0, 4)), ("same", None)):
        head = build(tiny(tmp_path, regime="lora_matched", protocol="causal", matched_alpha=alpha_rule), model).head
        assert head.scaling == pytest.approx(expected if expected else 1.0 / head.A.shape[0])


# ---------------------------------------------------------------------------- the analysis

def _lines(seeds=5, n=30, effect=-0.05):
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 20, n)
    frames = []
    for row, shift in (("chameleon_prefix", effect), ("chameleon_constant", 0.0)):
        for s in range(seeds):
            loss = tokens * (3 + shift + rng.normal(0, 0.02, n))
            frames.append(pd.DataFrame({"line": range(n), "tokens": tokens, "domain": "x", "row": row, "seed": s,
                                        **{f"loss_{b}": loss for b in BATCHINGS}}))
    return pd.concat(frames, ignore_index=True)


def test_paired_differences_equal_a_slow_loop():
    lines = _lines()
    out = paired(lines, "chameleon_prefix", "chameleon_constant", "kmeans")
    per_seed = []
    for s in range(5):
        a = lines[(lines.row == "chameleon_prefix") & (lines.seed == s)]
        b = lines[(lines.row == "chameleon_constant") & (lines.seed == s)]
        per_seed.append(a.loss_kmeans.sum() / a.tokens.sum() - b.loss_kmeans.sum() / b.tokens.sum())
    half = stats.t.ppf(0.975, 4) * np.std(per_seed, ddof=1) / math.sqrt(5)
    assert out["difference"] == pytest.approx(np.mean(per_seed))
    assert (out["t_low"], out["t_high"]) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    assert out["boot_low"] < out["difference"] < out["boot_high"] < 0


def test_identical_rows_are_found_and_nothing_else():
    lines = _lines(seeds=2)
    copy = lines[lines.row == "chameleon_prefix"].assign(row="chameleon_batch_mean_excl")
    nudged = copy.assign(row="chameleon_shuffled", loss_mixed=copy.loss_mixed + 1e-12)  # one batching differs
    lines = pd.concat([lines, copy, nudged], ignore_index=True)
    assert domains.identical_rows(lines) == [("chameleon_prefix", "chameleon_batch_mean_excl")]


def test_holm_adjusts_the_claimed_family():
    lines = _lines()
    extra = lines[lines.row == "chameleon_constant"].assign(row="lora_matched")
    table = domains.comparisons(pd.concat([lines, extra]))
    claims = table[table.batching == domains.PRIMARY_BATCHING].sort_values("p_seeds")
    m = len(claims)
    expected = np.minimum(1, np.maximum.accumulate([(m - i) * p for i, p in enumerate(claims.p_seeds)]))
    assert claims.p_holm.to_numpy() == pytest.approx(expected)
    assert table[table.batching != domains.PRIMARY_BATCHING].p_holm.isna().all()


def test_transformer2_rows_are_described_beside_the_claims_never_in_their_family():
    lines = _lines(seeds=3)
    prefix = lines[lines.row == "chameleon_prefix"]
    losses = [f"loss_{b}" for b in BATCHINGS]
    shifted = [prefix.assign(row=row, **{c: prefix[c] - gain * prefix.tokens for c in losses})
               for row, gain in (("svf", 0.3), ("svf_experts", 0.2))]  # nats per token below the prefix row
    lines = pd.concat([lines, *shifted], ignore_index=True)
    table, extra = domains.comparisons(lines), domains.described(lines)
    assert not {"svf", "svf_experts"} & (set(table["first"]) | set(table.second))  # not in the Holm family
    assert sorted(extra.groupby(["first", "second"]).batching.count().items()) == [
        (("svf", "chameleon_prefix"), 3), (("svf_experts", "svf"), 3)]
    assert extra.set_index(["first", "second"]).difference.groupby(level=[0, 1]).mean().to_dict() == pytest.approx(
        {("svf", "chameleon_prefix"): -0.3, ("svf_experts", "svf"): 0.1})
    said = domains.transformer2_answer(extra)
    assert said.startswith("On the six domains (descriptive: 3 seeds") and "-0.300 nats" in said
    assert said.count("+0.100 nats") == len(BATCHINGS)
    assert domains.transformer2_answer(domains.described(_lines(seeds=3))) is None


def test_each_row_takes_the_rate_of_the_row_it_is_tuned_as():
    grid = pd.DataFrame([dict(row="lora", lr=1e-3, dev_loss=3.0, status="ok"),
                         dict(row="lora", lr=3e-3, dev_loss=3.1, status="ok"),
                         dict(row="lora", lr=1e-2, dev_loss=math.nan, status="diverged: ..."),
                         dict(row="chameleon_prefix", lr=1e-3, dev_loss=2.9, status="ok"),
                         dict(row="chameleon_prefix", lr=3e-3, dev_loss=2.8, status="ok"),
                         dict(row="chameleon_prefix", lr=1e-2, dev_loss=2.85, status="ok"),
                         dict(row="svf", lr=1e-3, dev_loss=2.0, status="ok")])  # its grid not tried to the end
    rates = domains.chosen_rates(grid)
    assert rates["lora"] == 1e-3 and rates["chameleon_prefix"] == rates["chameleon_constant"] == 3e-3
    assert math.isnan(rates["unadapted"]) and "lora_matched" not in rates and "svf" not in rates


def test_the_experiment_runs_stage_by_stage_into_its_tables(tmp_path, labelled, monkeypatch):
    """tune -> run_seeds -> results_text on the tiny GPT-2, three rows, one rate, two seeds: every table is
    filled from the CSVs the stages wrote, and a rerun trains nothing again."""
    rows = {k: domains.ROWS[k] for k in ("unadapted", "chameleon_prefix", "chameleon_constant")}
    monkeypatch.setattr(domains, "ROWS", rows)
    monkeypatch.setattr(domains, "LR_GRID", (1e-2,))
    monkeypatch.setattr(domains, "COMPARISONS", [("chameleon_prefix", "chameleon_constant")])
    cfg = tiny(tmp_path, corpus=labelled)
    grid = domains.tune(cfg, progress=False)
    assert list(grid.row) == ["chameleon_prefix"] and (grid.status == "ok").all()
    runs = domains.run_seeds(cfg, seeds=2, progress=False)
    assert sorted(zip(runs.row, runs.seed)) == sorted((r, s) for r in rows for s in range(2))
    assert (runs[runs.row != "unadapted"].lr == 1e-2).all() and runs[runs.row == "unadapted"].lr.isna().all()
    out = domains.folder(cfg)
    text = domains.results_text(out)
    claim = domains.comparisons(domains.line_table(out)).query("batching == @domains.PRIMARY_BATCHING").iloc[0]
    assert f"| chameleon_prefix - chameleon_constant | 2 | {domains.fmt(claim.difference)} |" in text
    assert domains.run_seeds(cfg, seeds=2, progress=False).equals(runs)  # nothing is run twice
    monkeypatch.setenv("CHAMELEON_OUTPUTS", str(tmp_path / "outputs"))  # where the figure goes
    assert domains.report(cfg).read_text() == text
    assert (tmp_path / "outputs" / "figures" / cfg.profile / "domains_comparisons.png").is_file()
    assert not (tmp_path / "outputs" / "figures" / cfg.profile / "domains_transformer2.png").exists()  # no SVF rows


def test_tune_runs_each_plan_and_records_only_divergence(tmp_path, monkeypatch):
    """An experts row's oracle run comes first; a diverged run is a row marked so; any other failure stops."""
    from chameleon import training
    from chameleon.config import RunFailed

    seen = []

    def fake_train(cfg, progress=True, resume=False):
        seen.append((cfg.regime, cfg.dispatch, cfg.lr, cfg.dev_split))
        if cfg.lr == 1e-2:
            raise training.TrainingDiverged("val loss blew up")
        return {"val_loss": 3.0 + cfg.lr}

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(domains, "ROWS", {"lora_experts": domains.ROWS["lora_experts"]})
    monkeypatch.setattr(domains, "corpus_table", lambda cfg: pd.DataFrame())
    grid = domains.tune(tiny(tmp_path), progress=False)
    assert seen[:2] == [("lora_experts", "oracle", 1e-3, True), ("lora_experts", "classifier", 1e-3, True)]
    assert list(grid.status.str[:8]) == ["ok", "ok", "diverged"]
    monkeypatch.setattr(training, "train", lambda cfg, progress=True, resume=False: (_ for _ in ()).throw(RunFailed("locked")))
    with pytest.raises(RunFailed):
        domains.tune(tiny(tmp_path, lr=5e-4, results_dir=tmp_path / "other"), progress=False)
