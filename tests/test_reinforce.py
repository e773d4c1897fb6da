"""REINFORCE for SVF experts: the answer mask, the reward, sampling, the trainer, its run folder and its command."""
import json
import math

import pytest
import torch

from chameleon.__main__ import main
from chameleon.backbones import gpt2_tokenizer, load_backbone
from chameleon.serve.decoding import decode, greedy
from chameleon.serve.metrics import rouge_l, rouge_l_scores
from chameleon import Config
from chameleon.adapters.model import Adapted, build
from chameleon.reinforce import pack, reinforce, report_paths, sequence_log_probs
from chameleon.runs import load_trained, read_config, read_finished, run_dir, run_name
from chameleon.serve.adapter import Adapter
from chameleon.adapters.svf import target_layers

PROMPTS = ["### Instruction:\nName a colour.\n### Response:\n", "### Instruction:\nSay hello.\n### Response:\n",
           "### Instruction:\nCount to three.\n### Response:\n"]
REFERENCES = ["Blue.", "Hello there.", "One, two, three."]


def test_the_answer_mask_covers_the_answer_and_nothing_else():
    ids, attention, answer = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert answer.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_padded_log_probs_equal_each_row_alone(tiny_gpt2):
    """The trusted reference: every row scored alone, without padding."""
    prompts, answers = [[11, 12, 13, 14], [21]], [[31], [41, 42, 43]]
    with torch.no_grad():
        batched, _ = sequence_log_probs(tiny_gpt2, *pack(prompts, answers, pad_id=50256))
        alone = [sequence_log_probs(tiny_gpt2, *pack([p], [a], pad_id=50256))[0] for p, a in zip(prompts, answers)]
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5)


def test_the_reward_is_rouge_l_per_example():
    scores = rouge_l_scores(["the cat sat", "dogs bark loudly", "a b"], ["the cat sat", "birds sing", "a b c d"])
    assert scores[:2] == [1.0, 0.0] and 0 < scores[2] < 1
    assert rouge_l(["the cat sat", "dogs bark loudly"], ["the cat sat", "birds sing"]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        rouge_l_scores(["one output"], ["two", "references"])


def test_sampling_is_seeded_and_greedy_at_a_low_temperature(tiny_gpt2):
    policy = Adapted(tiny_gpt2, tiny_gpt2.get_output_embeddings(), blocks_adapted=False)
    prompt = torch.tensor([11, 22, 33])
    draw = lambda t, seed: decode(policy, prompt, 8, None, temperature=t, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(1.0, 0) == draw(1.0, 0) != draw(1.0, 1)
    assert draw(1e-4, 0) == greedy(policy, prompt, 8, None)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_reinforce_trains_z_only_and_reports_every_step(tiny_gpt2, tmp_path, kl_coef):
    tok = gpt2_tokenizer()
    before = {n: p.detach().clone() for n, p in tiny_gpt2.named_parameters()}
    adapted = build(Config.from_profile("smoke", backbone="gpt2-tiny", regime="svf", data_dir=tmp_path), tiny_gpt2)
    z0 = torch.cat([z.detach().clone() for z in adapted.svf.expert(0).values()])
    # a random model never matches a reference: a reward that varies between answers (their length) has a gradient
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=2e-3)
    history = reinforce(adapted, tok, PROMPTS, REFERENCES, opt, steps=3, batch_size=2, max_new_tokens=4,
                        kl_coef=kl_coef, progress=False, reward=lambda outs, refs: [len(o) / 10 for o in outs])
    assert len(history) == 3
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert ("kl" in history[0]) == (kl_coef > 0)
    assert not torch.equal(torch.cat(list(adapted.svf.expert(0).values())), z0)
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())
    assert all("forward" not in m.__dict__ for m in target_layers(tiny_gpt2).values())  # the layers' own forwards


def test_reinforce_settings_name_reinforce_runs_alone(tmp_path):
    # a next-token run's name ignores the REINFORCE fields, so the folders made before them are still theirs (the
    # hash itself depends on the installed data files' size and time: runs.fingerprint)
    for cfg in (Config.from_profile("cpu", regime="chameleon"), Config.from_profile("smoke", task="instructions",
                                                                                  regime="svf")):
        assert run_name(cfg.replace(reinforce_steps=3, max_grad_norm=1.0, temperature=0.7, kl_coef=0.1)) == run_name(cfg)
    rl = Config.from_profile("smoke", task="instructions", regime="svf", objective="reinforce")
    assert (rl.reinforce_steps, rl.batch_size, rl.lr) == (8, 4, 2e-3)  # config.REINFORCE_OVERRIDES over the profile
    changed = [rl.replace(**{k: v}) for k, v in [("reinforce_steps", 9), ("batch_size", 5), ("lr", 1e-3),
                                                 ("max_grad_norm", 1.0), ("temperature", 0.7), ("kl_coef", 0.1)]]
    names = {run_name(c) for c in [rl, *changed]}
    assert len(names) == 7 and all("-reinforce-seed0-" in n for n in names)
    with pytest.raises(ValueError, match="regime='svf'"):
        rl.replace(regime="lora")


def test_the_command_writes_a_run_folder_that_serves_the_trained_expert(tmp_path, capsys):
    argv = ["reinforce", "--profile", "smoke", "--backbone", "gpt2-tiny", "--results-dir", str(tmp_path / "results"),
            "--data-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--max-new-tokens", "3",
            "--n-generate", "2", "--kl-coef", "0.1", "--lr", "0.5"]
    # a random model's answers all earn ROUGE-L 0: the KL term gives z a gradient, and lr 0.5 moves z
    assert main(argv) == 0
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", results_dir=tmp_path / "results", data_dir=tmp_path,
                              task="instructions", regime="svf", objective="reinforce", reinforce_steps=2,
                              batch_size=2, max_new_tokens=3, n_generate=2, kl_coef=0.1, lr=0.5)
    run = run_dir(cfg)  # the options named the run as these fields do
    assert sorted(p.name for p in run.iterdir()) == ["centroids.safetensors", "checkpoint.safetensors", "config.json",
                                                     "metrics.json", "report.md"]
    result = read_finished(run)
    assert len(result["history"]) == 2 and read_config(run) == cfg
    assert result["command"].startswith("python -m chameleon reinforce")
    md, copy = report_paths(cfg)
    assert md.read_text() == (run / "report.md").read_text() and json.loads(copy.read_text()) == result
    assert "| unadapted | expert at init | expert after REINFORCE |" in md.read_text()

    written = {p: p.read_bytes() for p in [*run.iterdir(), md, copy]}
    capsys.readouterr()
    assert main(argv) == 0  # the finished run is read back, as `train` does: nothing is trained or written again
    assert str(run) in capsys.readouterr().out
    assert written == {p: p.read_bytes() for p in written}

    model = load_backbone("gpt2-tiny")[0]
    z = torch.cat(list(load_trained(cfg, model, run).svf.expert(0).values()))
    z0 = torch.cat(list(build(cfg, model).svf.expert(0).values()))  # the seeded init
    assert (z - z0).abs().max().item() == pytest.approx(result["z_change"]) and result["z_change"] > 0
    adapter, prompts = Adapter.from_run(run, device="cpu"), [g["prompt"] for g in result["generations"]]
    # the greedy answers of the model trained in memory, recorded by the run
    assert [r.text for r in adapter.generate(prompts)] == [g["after"] for g in result["generations"]]
    # the served expert is the trained one: its next-token distributions moved from the init's (the answers need
    # not: a random model with a tied head tends to repeat a prompt's last token, here a newline, whatever z is)
    enc = adapter.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = [a.logits(a.hidden(enc["input_ids"], enc["attention_mask"])) for a in (adapter.adapted, build(cfg, model))]
    assert (logits[0] - logits[1]).abs().max() > 1e-3
