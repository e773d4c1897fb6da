"""Greedy decoding against Hugging Face's own generate and a cache-free loop; the metrics' ranges."""
import shutil

import pytest
import torch

from chameleon.serve import metrics
from chameleon.config import Config
from chameleon.serve.decoding import greedy
from chameleon.serve.metrics import bleu, meteor, meteor_jar, rouge_l
from chameleon.adapters.hypernetwork import ChameleonHead
from chameleon.adapters.model import Adapted, build

PROMPT = torch.tensor([464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13])  # "The quick brown fox ..."


def test_greedy_equals_hf_generate(tiny_gpt2):
    adapted = Adapted(tiny_gpt2, tiny_gpt2.get_output_embeddings(), blocks_adapted=False)
    ref = tiny_gpt2.generate(PROMPT[None], do_sample=False, max_new_tokens=20, pad_token_id=50256,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):].tolist()
    assert greedy(adapted, PROMPT, 20, eos_id=None) == ref
    # with an EOS that HF would stop at: the output ends before it, EOS excluded
    eos = ref[5]
    assert greedy(adapted, PROMPT, 20, eos_id=eos) == ref[:ref.index(eos)]


def test_conditioned_greedy_equals_a_cache_free_loop(tiny_gpt2):
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", regime="chameleon", protocol="causal")
    adapted = build(cfg, tiny_gpt2).eval()
    assert isinstance(adapted.head, ChameleonHead)
    torch.manual_seed(1)
    with torch.no_grad():  # a large update, so the condition matters
        for p in adapted.head.hyper.parameters():
            p.normal_(0, 0.5)
    cond = torch.randn(32)
    ids = PROMPT.clone()
    with torch.no_grad():
        for _ in range(12):  # the slow reference: the whole sequence again at every step
            h = adapted.hidden(ids[None], torch.ones(1, len(ids), dtype=torch.long))[:, -1]
            ids = torch.cat([ids, adapted.logits(h, cond).argmax(-1)])
    slow = ids[len(PROMPT):].tolist()
    assert greedy(adapted, PROMPT, 12, eos_id=None, cond=cond) == slow
    assert greedy(adapted, PROMPT, 12, eos_id=None, cond=-cond) != slow  # the vector conditions the head


def test_metrics_are_percentages():
    refs = ["the cat sat on the mat today", "a dog barked loudly at the mailman"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge_l(refs, refs) == pytest.approx(100.0)
    assert bleu(["zebra quantum", "purple"], refs) == 0.0
    assert rouge_l(["zebra quantum", "purple"], refs) == 0.0
    partial = ["the cat sat on a mat", "a dog barked"]
    assert 0 < rouge_l(partial, refs) < 100 and 0 <= bleu(partial, refs) < 100
    assert bleu(["", ""], refs) == 0.0 and rouge_l(["", ""], refs) == 0.0


@pytest.mark.skipif(meteor_jar()[0] is None, reason=meteor_jar()[1])
def test_meteor_when_available():
    refs = ["the cat sat on the mat today", "a dog barked loudly\nat the mailman"]
    # a perfect line, and an empty one (newlines inside a text must not shift lines)
    score = meteor([refs[0], ""], refs)
    assert 40 < score < 60
    # the METEOR process serves later calls: same corpus, same score; another corpus, its own score
    assert meteor([refs[0], ""], refs) == score and meteor(refs, refs) > 99


def test_meteor_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    assert meteor(["a"], ["a"]) is None
    assert "pycocoevalcap" in meteor_jar()[1]
    if shutil.which("java") is None:
        return
    monkeypatch.undo()
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    if metrics.importlib.util.find_spec("pycocoevalcap"):
        assert "java" in meteor_jar()[1]
