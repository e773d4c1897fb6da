"""One adapter per line against one per batch (Config.cond_level, per-line dispatches): a one-line batch is the
batch-level path, a line run trains and evaluates per line, the batch-trained head evaluates per line from the
batch run's weights, per-line experts equal each line routed alone, serving makes one group per prompt, and export
refuses a per-line run with the reason."""

import numpy as np
import pandas as pd
import pytest
import torch

import conftest
from chameleon.config import Config
from chameleon.regimes import BATCHINGS
from chameleon.runs import LINES, load_trained, plan, run_dir, trained_by
from chameleon.serve.adapter import Adapter
from chameleon.serve.export import export_peft
from chameleon.training import train

tiny = conftest.tiny_domains


def test_a_one_line_batch_is_the_batch_level_path(gpt2_tiny):
    from chameleon.adapters.model import build

    model, _ = gpt2_tiny
    adapted = build(Config.from_profile("smoke", backbone="gpt2-tiny", regime="chameleon", conditioning="prefix",
                                        hyper_dropout=0.0), model).eval()
    g = torch.Generator().manual_seed(0)
    hidden, target = torch.randn(9, 64, generator=g), torch.randint(0, 50257, (9,), generator=g)
    cond = torch.randn(1, 64, generator=g)
    owner = torch.zeros(9, dtype=torch.long)
    with torch.no_grad():
        line = adapted.loss_sum(hidden, target, cond, owner)
        batch = adapted.loss_sum(hidden, target, cond[0])
        assert torch.allclose(line, batch, rtol=1e-5)
        assert torch.allclose(adapted.row_losses(hidden, target, cond, owner), adapted.row_losses(hidden, target, cond[0]),
                              rtol=1e-5)


def test_a_line_run_and_the_batch_trained_head_evaluated_per_line(tmp_path, labelled):
    line = tiny(tmp_path, corpus=labelled, regime="chameleon", conditioning="prefix", cond_level="line", lr=1e-2)
    batch, line_eval = line.replace(cond_level="batch"), line.replace(cond_level="line_eval")
    assert trained_by(line) is None and trained_by(line_eval) == batch
    assert len({run_dir(c).name for c in (line, batch, line_eval)}) == 3
    results = {c.cond_level: [train(s, progress=False) for s in plan(c)][-1] for c in (line, batch, line_eval)}
    assert results["line_eval"]["experts_from"] == run_dir(batch).name
    for level in ("line", "line_eval"):  # every line once, under every batching, whatever the grouping: per line
        lines = pd.read_csv(run_dir(line.replace(cond_level=level)) / LINES)
        assert np.allclose(lines.loss_clustered, lines.loss_mixed) and np.allclose(lines.loss_kmeans, lines.loss_mixed)
    assert results["line_eval"]["val_loss"] != pytest.approx(results["batch"]["val_loss"], abs=1e-7)
    assert results["line"]["val_loss"] != pytest.approx(results["line_eval"]["val_loss"], abs=1e-7)
    # serving: one group per prompt; export: refused with the reason
    adapter = Adapter.from_run(run_dir(line))
    prompts = ["The river number 3 flows", "def f2(x):", "The river number 9"]
    assert adapter.plan(prompts, group="single").groups == [0, 1, 2]
    with pytest.raises(ValueError, match="one adapter per input line"):
        export_peft(adapter, tmp_path / "export")


def test_per_line_experts_equal_each_line_routed_alone(tmp_path, labelled):
    cfg = tiny(tmp_path, corpus=labelled, regime="lora_experts", expert_groups="domain", n_experts=2, lr=1e-2,
               dispatch="oracle_line")
    for step in plan(cfg):
        result = train(step, progress=False)
    assert result["dispatch"] == "oracle_line"
    lines = pd.read_csv(run_dir(cfg) / LINES)
    # mixed batches hold both domains, yet each line met its own domain's expert: as a batch of that line alone
    from chameleon.backbones import load_backbone
    from chameleon.prepare import prepare
    from chameleon.training import batch_inputs, scored_rows

    model, tokenizer = load_backbone(cfg.backbone)
    adapted = load_trained(cfg, model)
    train_split, val, _ = prepare(cfg, model, tokenizer)
    adapted.bind(train_split, val)
    rows = scored_rows(adapted, val, False, cfg.cache_dir)
    with torch.no_grad():
        for i in range(0, len(val), 5):
            hidden, target, cond, owner = batch_inputs(adapted, val, rows, [i], [i], torch.device("cpu"))
            alone = float(adapted.row_losses(hidden, target, cond, owner).sum())
            assert alone == pytest.approx(lines.loss_mixed[i], rel=1e-5)
    with pytest.raises(ValueError, match="only head experts"):
        Config.from_profile("smoke", regime="svf_experts", dispatch="classifier_line")


def test_costs_count_adapters_per_line_and_time_each_step(tmp_path, labelled, monkeypatch):
    from chameleon.experiments import domains, domains_control as dc

    monkeypatch.setattr(dc, "TIMED_STEPS", 2)
    cfg = tiny(tmp_path, corpus=labelled, route_by="prefix", n_experts=2)
    table = pd.read_csv(dc.costs(cfg)).set_index("row")
    assert list(table.index) == list(dc.COST_ROWS)
    per_line = table.loc[["chameleon_prefix_line", "chameleon_prefix_line_eval", "lora_experts_line"]]
    assert (per_line.filter(like="adapters per") == 1000).all().all()
    batch = table.loc["chameleon_prefix"]
    assert batch["adapters per 1,000 lines (mixed)"] == pytest.approx(1000 / 8, rel=0.2)  # one per batch of 8
    assert batch["step ratio"] == 1 and batch["eval ratio"] == 1 and (table["step ratio"] > 0).all()
    assert (domains.folder(cfg) / "costs.csv").is_file()
    said = dc.cost_sentence(table.reset_index())  # what RESULTS.md and the README say of it
    line = table.loc["lora_experts_line"]
    assert f"lora_experts_line 1,000 adapters, step x{line['step ratio']:.2f}, evaluation x{line['eval ratio']:.2f}" in said


def test_the_line_family_is_holm_corrected_and_said_with_its_numbers():
    from chameleon.experiments import domains_control as dc
    from chameleon.experiments.stats import holm

    rng = np.random.default_rng(0)
    base = rng.uniform(2, 4, 40)
    frames = [pd.DataFrame({"line": range(40), "tokens": 10, "domain": "a", "row": row, "seed": s,
                            **{f"loss_{b}": (base + effect + rng.normal(0, 0.002, 40)) * 10 for b in BATCHINGS}})
              for row, effect in {"chameleon_prefix": 0.0, "chameleon_prefix_line": 0.03, "chameleon_prefix_line_eval": 0.0,
                                  "lora_experts_line": 0.01, "lora_experts_domain_line": -0.02}.items() for s in range(5)]
    v = dc.verdicts(pd.concat(frames, ignore_index=True))
    assert [(c["second"], c["batching"]) for c in v["lines"]] == [(s, b) for _, s, b in dc.LINE_FAMILY]
    assert [c["p_holm"] for c in v["lines"]] == pytest.approx(list(holm(np.array([c["p_seeds"] for c in v["lines"]]))))
    said = dc.line_answer(v)
    line = v["lines"][0]
    assert line["difference"] == pytest.approx(-0.03, abs=0.002) and line["significant"]
    assert f"{dc.fmt(line['difference'])} nats against chameleon_prefix_line on `kmeans`" in said
