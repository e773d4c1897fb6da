"""Summed cross-entropy of an LM head (+ LoRA update), chunk by chunk, never forming the (rows x vocab) logits.

    loss = fused_loss_sum(hidden, head.weight, target, bias=head.bias, low=scaling * hidden @ A.T, B=B)

equals `F.cross_entropy(hidden @ W.T + bias + low @ B.T, target, reduction="sum")`, with gradients for
hidden, bias, low and B (W, the frozen embedding tied to the head, gets none). A and a hypernetwork that
produced A or B get theirs from ordinary autograd through `low` and `B`.

Why: on a 49k vocabulary the head dominates a head-only step, and the plain path writes and re-reads
several logits-sized tensors (logits, a fresh copy for the low-rank update, log-softmax, the gradients of
both). Here each chunk of rows is turned into softmax - onehot in place right after its matmul (the softmax's
value at the target gives the loss) and folded into the gradients at once (the approach of Liger
Kernel's fused linear cross-entropy): the same matmuls as the plain path, one chunk-sized buffer alive. The
gradients are computed in the forward pass and scaled by the incoming gradient in backward, so nothing is
recomputed.
"""
from __future__ import annotations

import torch

IGNORE = -100
# Rows per chunk: 512 x 49,152 float32 logits = 96 MiB. On a loaded 2-core CPU smaller chunks were slower
# (each chunk streams the whole 113 MB head weight again), see benchmarks/bench_head.py and BENCHMARKS.md.
CHUNK = 512
# Below this, p[t] (a logit gap over ~69 nats) nears float32's denormals, where log p[t] loses digits.
TINY = 1e-30


class FusedLinearCrossEntropy(torch.autograd.Function):
    """forward(hidden (M, d), weight (V, d), bias (V,) | None, low (M, r) | None, B (V, r) | None,
    target (M,), chunk, need (grad flags of hidden, bias, low, B)) -> summed loss (0-dim, float32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, low, B, target, chunk, need):
        need_hidden, need_bias, need_low, need_B = need
        train = any(need)
        dtype = weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_hidden = torch.empty_like(hidden) if need_hidden else None
        g_low = torch.empty_like(low) if need_low else None
        # B's gradient is gathered transposed, (r, V): low.T @ d runs ~4x faster on CPU than d.T @ low
        g_Bt = torch.zeros(B.T.shape, dtype=torch.float32, device=B.device) if need_B else None
        g_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None

        def logits(h, lw):
            z = torch.addmm(bias, h, weight.T) if bias is not None else h @ weight.T
            if lw is not None:
                z.addmm_(lw, B.T)  # in place: no second logits-sized buffer
            return z.float()  # a no-op for a float32 head; as objectives.loss_sum, the softmax is taken in float32

        for s in range(0, hidden.shape[0], chunk):
            h, t, lw = hidden[s:s + chunk], target[s:s + chunk], None if low is None else low[s:s + chunk]
            z = logits(h, lw)
            keep = t != IGNORE
            t0 = torch.where(keep, t, 0)[:, None]
            # softmax in place (z is this chunk's own buffer): one pass over the vocabulary gives both the loss,
            # -log p[t], and the gradient, p - onehot (log-softmax then exp took two)
            d = torch.softmax(z, 1, out=z)
            p_t = d.gather(1, t0)[:, 0]
            nll = -p_t.log()
            far = keep & (p_t < TINY)
            # rare: those rows' log-softmax is recomputed, so the loss stays exact for any logit gap (meta tensors,
            # which trace devices, hold no values to test)
            if not far.is_meta and far.any():
                rows = far.nonzero()[:, 0]
                zf = logits(h[rows], None if lw is None else lw[rows])
                nll[rows] = -torch.log_softmax(zf, 1).gather(1, t0[rows])[:, 0]
            loss += torch.where(keep, nll, 0).sum()
            if not train:
                continue
            # d -> softmax - onehot(t), in place. Ignored rows are zeroed where they meet a gradient (a few
            # rows x r or x d), not with one more pass over rows x vocabulary.
            d.scatter_add_(1, t0, torch.full_like(t0, -1, dtype=d.dtype))
            dd = d.to(dtype)  # a no-op for a float32 head
            if need_hidden:
                torch.mm(dd, weight, out=g_hidden[s:s + chunk]).mul_(keep[:, None])
            if need_low:
                torch.mm(dd, B, out=g_low[s:s + chunk]).mul_(keep[:, None])
            if need_B:
                g_Bt.addmm_((lw * keep[:, None]).T.float(), d)
            if need_bias:
                g_bias += keep.float() @ d
            del z, d, dd
        ctx.grads = (g_hidden, None if g_bias is None else g_bias.to(bias.dtype), g_low,
                     None if g_Bt is None else g_Bt.T.contiguous().to(B.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The loss is a sum, so its gradients are the forward's, times the incoming scalar.
        g_hidden, g_bias, g_low, g_B = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return g_hidden, None, g_bias, g_low, g_B, None, None, None


def fused_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   bias: torch.Tensor | None = None, low: torch.Tensor | None = None,
                   B: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of logits = hidden @ weight.T + bias + low @ B.T over rows whose target is not -100.

    Args:
        hidden: (..., d) hidden states; flattened to rows.
        weight: (V, d) head weight; must not require a gradient (it would not get one).
        target: (...,) token ids, -100 where a row is not scored.
        bias: (V,) head bias, or None.
        low: (..., r) the LoRA bottleneck scaling * hidden @ A.T, or None for the bare head.
        B: (V, r) LoRA up-projection; given with `low`.
        chunk: rows per chunk; bounds the largest temporary at chunk x V.

    Returns:
        The summed loss, a float32 scalar.
    """
    if (low is None) != (B is None):
        raise ValueError("give both low and B (a LoRA update) or neither (the bare head)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    kind = hidden.device.type  # some devices ("meta") have no autocast to ask about
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        # a bf16 run (training.precision): the head's loss in float32, as autocast takes a cross-entropy; the
        # chunks write in place and into buffers, which autocast never casts
        with torch.autocast(kind, enabled=False):
            return fused_loss_sum(*(None if x is None else x.float() for x in (hidden, weight)), target,
                                  *(None if x is None else x.float() for x in (bias, low, B)), chunk)
    grad = torch.is_grad_enabled()
    if grad and weight.requires_grad:
        raise ValueError("the fused loss gives the head weight no gradient: freeze it or use the plain loss")
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if low is not None:
        low = low.reshape(-1, low.shape[-1])
    need = tuple(grad and x is not None and x.requires_grad for x in (hidden, bias, low, B))
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, low, B, target, chunk, need)
