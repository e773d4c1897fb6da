"""REINFORCE for SVF experts: the answer mask, the reward, sampling, the trainer and its command."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from chameleon.__main__ import main
from chameleon.backbones import gpt2_tokenizer, load_backbone
from chameleon.generation import decode, greedy, rouge_l, rouge_l_scores
from chameleon import Config
from chameleon.model import Adapted, build
from chameleon.reinforce import pack, reinforce
from chameleon.svf import sequence_log_probs, target_layers

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
    history = reinforce(adapted, tok, PROMPTS, REFERENCES, steps=3, batch_size=2, max_new_tokens=4,
                        kl_coef=kl_coef, progress=False, reward=lambda outs, refs: [len(o) / 10 for o in outs])
    assert len(history) == 3
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert ("kl" in history[0]) == (kl_coef > 0)
    assert not torch.equal(torch.cat(list(adapted.svf.expert(0).values())), z0)
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())
    assert all("forward" not in m.__dict__ for m in target_layers(tiny_gpt2).values())  # the layers' own forwards


def test_the_command_writes_its_files_and_never_overwrites_them_silently(tmp_path, capsys):
    argv = ["reinforce", "--profile", "smoke", "--backbone", "gpt2-tiny", "--results-dir", str(tmp_path),
            "--data-dir", str(tmp_path), "--steps", "2", "--batch-size", "2", "--max-new-tokens", "3",
            "--n-generate", "2"]
    assert main(argv) == 0
    folder = tmp_path / "smoke" / "instructions"
    assert sorted(p.name for p in folder.iterdir()) == [f"reinforce-seed0.{e}" for e in ("json", "md", "safetensors")]
    result = json.loads((folder / "reinforce-seed0.json").read_text())
    assert len(result["history"]) == 2 and set(result["rouge_l"]) == {"unadapted", "before", "after", "n"}
    assert result["command"].startswith("python -m chameleon reinforce") and result["config"]["backbone"] == "gpt2-tiny"
    z = load_file(folder / "reinforce-seed0.safetensors")
    assert z.keys() == target_layers(load_backbone("gpt2-tiny")[0]).keys()  # one z per adapted matrix
    written = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "reinforce-seed0" in err and "exists" in err and "--force" in err
    assert written == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(argv + ["--force"]) == 0
