"""The chunked LM-head loss against the trusted reference: F.cross_entropy on the full logits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chameleon.fused_loss import fused_loss_sum
from chameleon.adapters.hypernetwork import ChameleonHead
from chameleon.adapters.lora import LoRA, add_lora, freeze
from chameleon.adapters.model import Adapted

V, D, M, R = 1000, 24, 70, 4  # 70 rows in chunks of 16: four full chunks and a partial one


def close(got, want, rel=1e-5):
    """Max abs difference within rel x the reference's largest entry (float32)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max(), (got - want).abs().max()


def data(seed=0, bias=False, bias_grad=False):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    head.weight.requires_grad_(False)
    if bias:
        head.bias.requires_grad_(bias_grad)
    hidden = torch.randn(M, D, generator=g).requires_grad_()
    target = torch.randint(V, (M,), generator=g)
    target[[0, 17, 33, 69]] = -100  # ignored rows, in several chunks
    return head, hidden, target


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("bias", [False, True])
def test_bare_head_matches_cross_entropy(bias):
    head, hidden, target = data(bias=bias, bias_grad=bias)
    inputs = [hidden] + ([head.bias] if bias else [])
    want = F.cross_entropy(head(hidden), target, reduction="sum")
    got = fused_loss_sum(hidden, head.weight, target, head.bias, chunk=16)
    close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        close(a, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flavour", ["authors", "standard"])
def test_lora_head_matches_cross_entropy(bias, flavour):
    head, hidden, target = data(bias=bias)
    lora = LoRA(head, R, alpha=2.0, flavour=flavour, generator=0)
    with torch.no_grad():
        lora.B.normal_(std=0.1)  # a trained-looking B, so the update matters for the loss and for grad A
    inputs = [hidden, lora.A, lora.B]
    want = F.cross_entropy(lora(hidden), target, reduction="sum")
    got = fused_loss_sum(hidden, head.weight, target, head.bias, hidden @ lora.A.T * lora.scaling, lora.B, chunk=16)
    close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        close(a, b)


@pytest.mark.parametrize("chunk", [1, 16, 64, 1000])
def test_chameleon_head_gives_the_hypernetwork_the_same_gradients(chunk):
    head, hidden, target = data(bias=True)
    torch.manual_seed(0)
    cham = ChameleonHead(head, d_cond=8, rank=R, alpha=1.0, flavour="authors", hidden=(16, 8)).eval()
    adapted = Adapted(nn.Identity(), cham, blocks_adapted=False)
    cond = torch.randn(8, generator=torch.Generator().manual_seed(1))
    inputs = [hidden, *cham.hyper.parameters()]
    want = F.cross_entropy(cham(hidden, cond), target, reduction="sum")
    got = adapted.loss_sum(hidden, target, cond, chunk=chunk)
    close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        close(a, b)


@pytest.mark.parametrize("chunk", [16, 1000])
def test_per_line_adapters_as_one_block_diagonal_lora(chunk):
    """cond_level "line": 7 lines of 10 rows, each through its own generated adapter; the fused loss over the
    block-diagonal segments equals the plain per-example head (ChameleonHead with 2-D cond), gradients included."""
    head, hidden, target = data(bias=True)
    torch.manual_seed(0)
    cham = ChameleonHead(head, d_cond=8, rank=R, alpha=1.0, flavour="authors", hidden=(16,)).eval()
    adapted = Adapted(nn.Identity(), cham, blocks_adapted=False)
    cond, owner = torch.randn(7, 8), torch.arange(7).repeat_interleave(10)
    inputs = [hidden, *cham.hyper.parameters()]
    want = F.cross_entropy(cham(hidden.view(7, 10, D), cond).reshape(-1, V), target, reduction="sum")
    got = adapted.loss_sum(hidden, target, cond, owner, chunk=chunk)
    close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        close(a, b)
    rows = adapted.row_losses(hidden, target, cond, owner, chunk=chunk)
    close(rows.sum(), want.detach())


def test_gpt2_tiny_head_with_lora_through_adapted(tiny_gpt2):
    model = freeze(tiny_gpt2)
    add_lora(model, "head", rank=R, alpha=1.0, flavour="authors", generator=0)
    adapted = Adapted(model, model.get_output_embeddings(), blocks_adapted=False)
    ids = torch.randint(50_257, (3, 20), generator=torch.Generator().manual_seed(0))
    hidden = adapted.hidden(ids, torch.ones_like(ids)).detach().reshape(-1, 32).requires_grad_()
    target = ids.roll(-1, 1).reshape(-1)
    target[::7] = -100
    inputs = [hidden, adapted.head.A, adapted.head.B]
    want = F.cross_entropy(adapted.logits(hidden), target, reduction="sum")
    got = adapted.loss_sum(hidden, target, chunk=16)
    close(got, want)
    for a, b in zip(grads(got, inputs), grads(want, inputs), strict=True):
        close(a, b)
    with torch.no_grad():  # evaluation: the loss without gradients
        close(adapted.loss_sum(hidden, target, chunk=16), want.detach())


def test_a_trainable_head_weight_is_refused():
    head, hidden, target = data()
    with pytest.raises(ValueError, match="no gradient"):
        fused_loss_sum(hidden, head.weight.requires_grad_(), target)


def test_a_target_far_below_the_top_logit_keeps_an_exact_loss():
    head, hidden, target = data()
    hidden = (hidden.detach() * 40).requires_grad_()  # logit gaps of hundreds of nats
    target = (hidden @ head.weight.T).argmin(1).detach()  # p[target] underflows float32
    want = F.cross_entropy(head(hidden), target, reduction="sum")
    got = fused_loss_sum(hidden, head.weight, target, chunk=16)
    assert torch.isfinite(got)
    close(got, want)
    close(grads(got, [hidden])[0], grads(want, [hidden])[0])


def test_under_bf16_autocast_the_loss_is_taken_in_float32():
    """A bf16 run (training.precision) autocasts the LoRA bottleneck to bfloat16; the fused loss then computes in
    float32 from those values, as the plain path's cross-entropy would, and its gradients reach float32 weights."""
    head, hidden, target = data()
    A, B = (torch.randn(R, D) * 0.1).requires_grad_(), (torch.randn(V, R) * 0.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = hidden @ A.T
        loss = fused_loss_sum(hidden, head.weight, target, low=low, B=B, chunk=16)
        low_again = hidden @ A.T  # the same bfloat16 values, on a graph of their own
    assert low.dtype == torch.bfloat16 and loss.dtype == torch.float32
    want = F.cross_entropy(hidden @ head.weight.T + low_again.float() @ B.T, target, reduction="sum")
    close(loss, want)
    for got, ref in zip(grads(loss, [hidden, A, B]), grads(want, [hidden, A, B])):
        assert got.dtype == torch.float32
        close(got, ref)
