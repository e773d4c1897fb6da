"""What is scored, and how the loss splits by target kind (issue 10), on a 2-layer GPT-2."""
import math
from functools import partial

import pandas as pd
import pytest
import torch

from chameleon import objectives
from chameleon.backbones import load_backbone
from chameleon.experiments.compare import run_rows
from chameleon.embeddings import mean_embeddings
from chameleon.prepare import prepare
from chameleon.experiments.report import paired_differences
from chameleon.training import train

import conftest

tiny = partial(conftest.tiny, max_train_examples=64, max_eval_examples=32)  # the smoke profile's sizes


def test_paper_loss_is_the_mixture_of_its_pad_and_real_parts(tmp_path):
    cfg = tiny(tmp_path, regime="chameleon", protocol="authors", max_length=24)
    result = train(cfg, progress=False)
    model, tokenizer = load_backbone(cfg.backbone)
    _, val, _ = prepare(cfg, model, tokenizer)
    scored = val.targets[:, -1] != objectives.IGNORE
    padded = val.input_ids[:, -1] == tokenizer.pad_token_id  # measured on the tokens, not on the targets
    share = (padded & scored).sum().item() / scored.sum().item()
    assert 0 < share < 1  # both kinds are there at 24 tokens
    for h in result["history"]:
        assert h["pad_share"] == pytest.approx(share, abs=1e-12)
        mixture = h["pad_share"] * h["val_loss_pad"] + (1 - h["pad_share"]) * h["val_loss_real"]
        assert h["val_loss"] == pytest.approx(mixture, abs=1e-6)
    assert result["pad_share"] == pytest.approx(share)


def test_causal_protocol_has_no_pad_targets(tmp_path):
    result = train(tiny(tmp_path, regime="lora", protocol="causal"), progress=False)
    assert result["pad_share"] == 0 and result["val_loss_pad"] is None
    assert result["val_loss_real"] == pytest.approx(result["val_loss"], abs=1e-9)


def test_score_from_scores_every_regime_on_the_prefix_runs_tokens(tmp_path):
    model, tokenizer = load_backbone("gpt2-tiny")
    base = tiny(tmp_path, protocol="causal", prefix_tokens=8)
    prefix = prepare(base.replace(conditioning="prefix"), model, tokenizer)
    for conditioning in ("batch_mean", "shuffled", "batch_mean_excl"):
        other = prepare(base.replace(conditioning=conditioning, score_from=8), model, tokenizer)
        for a, b in zip(prefix[:2], other[:2]):
            assert torch.equal(a.targets, b.targets)
    everything = prepare(base.replace(conditioning="batch_mean"), model, tokenizer)[0]
    assert (everything.targets != objectives.IGNORE).sum() > (prefix[0].targets != objectives.IGNORE).sum()
    assert (prefix[0].targets[:, :7] == objectives.IGNORE).all()  # position 7 predicts token 8, the first scored


@pytest.mark.parametrize("protocol", ["authors", "causal"])
def test_batch_mean_excl_leaves_out_every_scored_target_token(tmp_path, protocol):
    model, tokenizer = load_backbone("gpt2-tiny")
    split = prepare(tiny(tmp_path, protocol=protocol, conditioning="batch_mean_excl", max_length=24), model, tokenizer)[0]
    full = prepare(tiny(tmp_path, protocol=protocol, conditioning="batch_mean", max_length=24), model, tokenizer)[0]
    # the tokens that are targets: the last one (authors), every real token after the first (causal)
    keep = torch.ones_like(split.input_ids, dtype=torch.bool)
    if protocol == "authors":
        keep[:, -1] = split.targets[:, -1] == objectives.IGNORE
    else:
        keep[:, 1:] = split.targets[:, :-1] == objectives.IGNORE
        keep &= split.attention.bool()
    expected = mean_embeddings(model, split.input_ids, keep.long())
    assert torch.allclose(split.cond_emb, expected, atol=1e-6)
    assert not torch.allclose(split.cond_emb, full.cond_emb, atol=1e-3)


def test_prefix_row_gets_baselines_scored_on_the_same_tokens(tmp_path):
    cfg = tiny(tmp_path, prefix_tokens=8)
    table = run_rows(cfg, 1, [("unadapted", "batch_mean"), ("chameleon", "prefix")], ("authors", "causal"), progress=False)
    assert list(zip(table.regime, table.protocol, table.scored)) == [
        ("unadapted", "authors", "last"), ("chameleon", "authors", "last"),
        ("unadapted", "causal", "all"), ("chameleon", "causal", "from 8"), ("unadapted", "causal", "from 8")]


def test_paired_differences_on_a_toy_table():
    rows = []
    for seed, (ref, better, same) in enumerate([(1.0, 0.90, 1.05), (1.2, 1.11, 1.10), (1.1, 0.99, 1.12)]):
        for regime, conditioning, loss in [("lora_matched", "-", ref), ("chameleon", "batch_mean", better),
                                           ("chameleon", "shuffled", same)]:
            rows.append(dict(regime=regime, protocol="causal", conditioning=conditioning, scored="all", seed=seed,
                             val_loss=loss))
    out = paired_differences(pd.DataFrame(rows), {"regime": "lora_matched"}).set_index("conditioning")
    better, same = out.loc["batch_mean"], out.loc["shuffled"]
    diffs = [-0.10, -0.09, -0.11]  # mean -0.10, sd 0.01: half-width t(0.975, 2) * 0.01 / sqrt(3)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert better.difference == pytest.approx(-0.10) and better.high == pytest.approx(-0.10 + half)
    assert better.low == pytest.approx(-0.10 - half) and better.significant and better.seeds == 3
    assert better.per_seed == " ".join(f"{d:+.4f}" for d in diffs)
    assert not same.significant  # +0.05, -0.10, +0.02: the interval holds 0


def test_paper_length_and_heads_write_their_tables_with_the_command(tmp_path, monkeypatch):
    from chameleon.experiments import compare
    from chameleon.experiments.compare import heads, paper_length

    shares = pd.DataFrame([{"tokenizer": t, "lines": w, "n_lines": 10, "length": n, "padded_share": 0.5}
                           for t in ("gpt2", "smollm2") for w in ("corpus", "subsample") for n in (24, 256)])
    monkeypatch.setattr(compare, "padded_shares", lambda cfg: shares)  # tokenising the whole corpus is slow
    cfg = tiny(tmp_path, max_train_examples=16, max_eval_examples=8, prefix_tokens=8)  # 25 runs: the least data
    table = paper_length(cfg, lengths=(24,), seeds=1, progress=False)
    assert set(table.max_length) == {24} and (table.scored == "last").all()
    assert {"val_loss_pad", "val_loss_real", "pad_share"} <= set(table.columns)
    folder = tmp_path / "results" / "smoke" / "lm"
    text = (folder / "paper-length-seeds1.md").read_text()
    assert text.startswith("Produced by `python -m chameleon compare --profile smoke --task lm --experiment "
                           "paper-length --seeds 1 --backbone gpt2-tiny")
    assert "batch_mean_excl" in text and "gpt2 (corpus)" in text
    with pytest.raises(ValueError, match="--seeds 1 gives no interval"):
        heads(cfg, seeds=1, progress=False)
    heads(cfg, seeds=2, progress=False)
    paired = pd.read_csv(folder / "heads-seeds2-paired.csv")
    assert set(paired.reference) == {"lora_matched", "chameleon / shuffled"}
    prefix = paired[(paired.conditioning == "prefix") & (paired.reference == "lora_matched")]
    assert list(prefix.scored) == ["from 8"]  # paired with the baseline scored on the same tokens
