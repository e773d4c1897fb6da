import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from chameleon.adapters.hypernetwork import ChameleonHead, HyperNetwork
from chameleon.adapters.lora import freeze, trainable_parameters


def make_head(base, flavour="authors", d_cond=12, rank=3):
    """A ChameleonHead in eval mode whose last layer is scaled up so that the adapter visibly changes the logits."""
    torch.manual_seed(0)
    head = ChameleonHead(base, d_cond=d_cond, rank=rank, alpha=2.0, flavour=flavour).eval()
    with torch.no_grad():
        head.hyper.net[-1].weight.mul_(300)
        head.hyper.net[-1].bias.normal_()
    return head


def test_counts_match_the_paper_and_keep_the_tie():
    model = freeze(GPT2LMHeadModel(GPT2Config()))
    head = ChameleonHead(model.get_output_embeddings(), d_cond=768, rank=4, alpha=1.0)
    assert trainable_parameters(head) == 6_786_596 == 768 * 64 + 64 + 64 * 32 + 32 + 32 * 204_100 + 204_100
    assert sum(p.numel() for p in HyperNetwork(768, 768, 50_257, 4).parameters()) == 6_786_596
    assert head.base.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_architecture_and_init():
    torch.manual_seed(0)
    hyper = HyperNetwork(d_cond=16, d_in=24, d_out=500, rank=4)
    assert [type(m) for m in hyper.net] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert [m.out_features for m in hyper.net if isinstance(m, nn.Linear)] == [64, 32, 4 * (24 + 500)]
    assert hyper.net[2].p == hyper.net[5].p == 0.5
    last = hyper.net[-1]
    assert last.weight.std().item() == pytest.approx(1e-3, rel=0.05)
    assert torch.count_nonzero(last.bias) == 0


def test_shapes_single_and_batched():
    hyper = HyperNetwork(d_cond=16, d_in=24, d_out=50, rank=4).eval()
    A, B = hyper(torch.randn(16))
    assert A.shape == (4, 24) and B.shape == (50, 4)
    A, B = hyper(torch.randn(3, 16))
    assert A.shape == (3, 4, 24) and B.shape == (3, 50, 4)


def test_standard_starts_at_the_base_head_and_paper_does_not(tiny_gpt2):
    torch.manual_seed(0)
    hidden, cond = torch.randn(2, 5, 32), torch.randn(32)
    with torch.no_grad():
        base = tiny_gpt2.lm_head(hidden)
        standard = ChameleonHead(tiny_gpt2.lm_head, d_cond=32, rank=4, alpha=1.0, flavour="standard").eval()
        A, B = standard.generate_adapter(cond)
        assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
        assert torch.equal(standard(hidden, cond), base)
        paper = ChameleonHead(tiny_gpt2.lm_head, d_cond=32, rank=4, alpha=1.0, flavour="authors").eval()
        assert not torch.equal(paper(hidden, cond), base)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_dense_update(bias):
    torch.manual_seed(0)
    base = nn.Linear(8, 40, bias=bias)
    head = make_head(base)
    hidden, cond = torch.randn(2, 5, 8), torch.randn(12)
    with torch.no_grad():
        A, B = head.generate_adapter(cond)
        W = base.weight + head.scaling * B @ A
        dense = hidden @ W.T + (base.bias if bias else 0)
        torch.testing.assert_close(head(hidden, cond), dense)
        assert (dense - base(hidden)).abs().max() > 0.1  # the adapter is not negligible here


def test_per_example_path_equals_looping_the_batch_path():
    head = make_head(nn.Linear(8, 40).double())  # float64: the two paths sum in different orders
    assert head.hyper.net[0].weight.dtype == torch.float64  # the hypernetwork follows the head's dtype
    cond = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        for hidden in (torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)):
            looped = torch.stack([head(hidden[i], cond[i]) for i in range(3)])
            torch.testing.assert_close(head(hidden, cond), looped)  # (B, T, d) and (N, d) hidden states


def test_only_the_hypernetwork_learns(tiny_gpt2):
    freeze(tiny_gpt2)
    head = ChameleonHead(tiny_gpt2.lm_head, d_cond=32, rank=4, alpha=1.0, flavour="standard", dropout=0.0)
    hidden, cond = torch.randn(4, 6, 32), torch.randn(32)
    targets = torch.randint(0, 50_257, (4, 6))
    loss = nn.functional.cross_entropy(head(hidden, cond).flatten(0, 1), targets.flatten())
    loss.backward()
    assert tiny_gpt2.lm_head.weight.grad is None
    assert {n for n, p in head.named_parameters() if p.grad is not None} == {
        n for n, _ in head.hyper.named_parameters(prefix="hyper")}
    torch.optim.AdamW(head.hyper.parameters(), lr=1e-2).step()
    with torch.no_grad():
        assert nn.functional.cross_entropy(head(hidden, cond).flatten(0, 1), targets.flatten()) < loss
