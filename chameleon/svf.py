"""Singular Value Fine-tuning (SVF), the adapter of Transformer² (Sakana AI, arXiv 2501.06252).

Every adapted matrix W (out, in) is decomposed once, W = U diag(S) Vh, in float32. An expert is one
vector z per matrix (length min(out, in)); it rescales the singular values:

    W' = U diag(S * sigmoid(z)) Vh * sum(S) / sum(S * sigmoid(z))

The factor keeps the sum of singular values, so a constant sigmoid(z) gives W' = W exactly. Experts
are trained by REINFORCE (the reference) or by next-token loss; at inference a dispatch picks one
(a classifier, the true group as an oracle) or mixes them, z' = sum_k alpha_k z_k, with alpha found
by a few-shot CEM search.

    svf = SVF(decompose(model, "mlp", cfg.cache_dir))   # the frozen SVDs; an expert is {layer name: z}
    with svf.factored(model, z):     # x W'^T computed factored, never forming W': train z
        loss = model(...).loss
    svf.weight(name, z)              # W' itself, built once for evaluation (model.SVFExperts)

`model.SVFExperts` holds the experts' z and applies them to a model in exactly these two ways.

The reference code (github.com/SakanaAI/self-adaptive-llms, Apache-2.0) was read for its
conventions; none of it is copied here.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from chameleon.cache import write_atomic

# Which submodules are adapted: a layer is a target when one of its parents has one of these names.
# GPT-2: h.i.mlp.c_fc / c_proj, h.i.attn.c_attn / c_proj; Llama: layers.i.mlp.{gate,up,down}_proj,
# layers.i.self_attn.{q,k,v,o}_proj. The reference adapts MLP matrices only.
TARGETS = {"mlp": ("mlp",), "mlp+attn": ("mlp", "attn", "self_attn")}
CACHE_VERSION = 1  # bump when the file layout or the decomposition changes


# ---------------------------------------------------------------------------- decomposition

def target_layers(model: nn.Module, targets: str = "mlp") -> dict[str, nn.Module]:
    """The nn.Linear / Conv1D layers SVF adapts, by qualified name, in module order (never the LM head).

    Args:
        model: a Hugging Face causal LM.
        targets: "mlp" (the reference) or "mlp+attn".
    """
    if targets not in TARGETS:
        raise ValueError(f"unknown SVF targets {targets!r}; choose one of {list(TARGETS)}")
    head = model.get_output_embeddings()
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, Conv1D)) and m is not head
              and set(name.split(".")[:-1]) & set(TARGETS[targets])}
    if not layers:
        raise ValueError(f"no {targets} nn.Linear / Conv1D layer found in {type(model).__name__}")
    return layers


def matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as the (out, in) matrix of y = W x. GPT-2's Conv1D stores it as (in, out)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _key(layers: dict[str, nn.Module], targets: str) -> str:
    """Canonical cache key: the targets and a hash of the names, shapes and bytes of the adapted matrices."""
    h = hashlib.sha256()
    for name, layer in layers.items():
        w = matrix(layer).detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(w.numpy().tobytes())
    return json.dumps({"version": CACHE_VERSION, "targets": targets, "weights": h.hexdigest()},
                      sort_keys=True, separators=(",", ":"))


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float32 as the reference; the reduced SVD: U (out, k), S (k,), Vh (k, in), k = min(out, in)
    U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def _read(path: Path, key: str, layers: dict[str, nn.Module]):
    """The decomposition stored at `path`, or None (with a warning) when it is unreadable or not ours."""
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:  # checked before any tensor is read
                raise ValueError("its key is not this backbone's")
            out = {}
            for name, layer in layers.items():
                d_out, d_in = matrix(layer).shape
                k = min(d_out, d_in)
                U, S, Vh = (f.get_tensor(f"{name}.{part}") for part in ("U", "S", "Vh"))
                if (U.shape, S.shape, Vh.shape) != ((d_out, k), (k,), (k, d_in)):
                    raise ValueError(f"{name} has shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}")
                out[name] = (U, S, Vh)
        return out
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        warnings.warn(f"SVD cache {path} is unusable ({err}); decomposing again", stacklevel=3)
        return None


def decompose(model: nn.Module, targets: str = "mlp", cache_dir: Path | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SVD of every adapted matrix, W = U diag(S) Vh, with W the (out, in) matrix of y = W x.

    Args:
        model: a Hugging Face causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...).
        targets: "mlp" (the reference: GPT-2 c_fc / c_proj, Llama gate / up / down_proj) or "mlp+attn".
        cache_dir: the kit's cache folder (`cfg.cache_dir`); the result is stored in its "svd/" as
            <key hash>.safetensors, keyed by the adapted weights and the targets. None: no cache.

    Returns:
        name -> (U, S, Vh) in float32, on the weights' device, in module order.

    Cost, SmolLM2-135M's MLP (90 matrices, 51,840 z's), 2-core CPU: about 2 min of CPU time (266 s
    wall on a busy shared machine), a 418 MiB cache file read back in 0.3 s. On a GPU, move the
    model there first: the SVDs run on the weights' device.
    """
    layers = target_layers(model, targets)
    device = next(iter(layers.values())).weight.device
    path = None
    if cache_dir is not None:
        key = _key(layers, targets)
        path = Path(cache_dir) / "svd" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists() and (cached := _read(path, key, layers)) is not None:
            return {name: tuple(t.to(device) for t in usv) for name, usv in cached.items()}
    svd = {name: _svd(matrix(layer)) for name, layer in layers.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{part}": t.cpu() for name, usv in svd.items() for part, t in zip(("U", "S", "Vh"), usv)}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
    return svd


# ---------------------------------------------------------------------------- the adapter

class SVFMatrix(nn.Module):
    """One adapted matrix: its frozen U, S, Vh, and W' for a given z."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
        super().__init__()
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)

    def _scales(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S * sigmoid(z), and the factor that keeps sum(S)."""
        s = self.S * torch.sigmoid(z)
        return s, self.S.sum() / s.sum()

    def weight(self, z: torch.Tensor) -> torch.Tensor:
        """W' (out, in) for `z`."""
        s, keep = self._scales(z)
        # (U * s) @ Vh is U diag(s) Vh without the k x k diagonal
        return (self.U * s) @ self.Vh * keep

    def apply(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x W'^T without forming W' (no bias): ((x Vh^T) * s') U^T, s' the rescaled singular values.

        Costs N k (in + out) multiply-adds for N rows of x, against out k in + N in out for building W'
        first: the cheaper way while training z on small batches (W' changes every step)."""
        s, keep = self._scales(z)
        U, s, Vh = (t.to(x.dtype) for t in (self.U, s * keep, self.Vh))
        return ((x @ Vh.T) * s) @ U.T

    def extra_repr(self) -> str:
        return f"out={self.U.shape[0]}, in={self.Vh.shape[1]}, k={self.S.numel()}"


class SVF(nn.Module):
    """The frozen SVDs of one backbone's adapted matrices. An expert is a plain dict {layer name: z} (z of
    length min(out, in) per matrix); `mix()` combines several. The model is never modified: `factored`
    replaces the adapted layers' forwards for a block, `weight` gives W' to run the body on."""

    def __init__(self, svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        """
        Args:
            svd: name -> (U, S, Vh), from `decompose`.
        """
        super().__init__()
        self.names = list(svd)
        self.matrices = nn.ModuleDict({self.slot(name): SVFMatrix(U, S, Vh) for name, (U, S, Vh) in svd.items()})

    @staticmethod
    def slot(name: str) -> str:
        return name.replace(".", "-")  # module names may not contain "."; "-" never occurs in one

    def __getitem__(self, name: str) -> SVFMatrix:
        return self.matrices[self.slot(name)]

    def weight(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """W' (out, in) of layer `name` for `z`."""
        return self[name].weight(z)

    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = {name: model.get_submodule(name) for name in self.names}
        for name, layer in layers.items():
            if tuple(matrix(layer).shape) != (self[name].U.shape[0], self[name].Vh.shape[1]):
                raise ValueError(f"{name} is {tuple(matrix(layer).shape)} in the model but "
                                 f"{(self[name].U.shape[0], self[name].Vh.shape[1])} in the SVD")
        return layers

    @contextlib.contextmanager
    def factored(self, model: nn.Module, zs: dict[str, torch.Tensor]):
        """For a block, every adapted layer computes x W'^T + b as `SVFMatrix.apply` for the expert `zs`,
        never forming W'. Nothing is copied; each layer's own forward is back on exit (the graph built
        inside stays valid for backward)."""
        layers = self._layers(model)

        def forward(m: SVFMatrix, z, bias, x):
            y = m.apply(x, z)
            return y if bias is None else y + bias

        try:
            for name, layer in layers.items():
                layer.forward = functools.partial(forward, self[name], zs[name], layer.bias)
            yield model
        finally:
            for layer in layers.values():
                layer.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------- mixing and dispatch

def mix(experts: Sequence[dict[str, torch.Tensor]], alpha: Sequence[float] | torch.Tensor) -> dict[str, torch.Tensor]:
    """z' = sum_k alpha_k z_k with alpha normalised to sum 1 (as the reference's weighted combination).

    Args:
        experts: K experts, each {layer name: z}.
        alpha: K non-negative weights; all zero counts as uniform (the normalisation is undefined).

    The mix is an expert like any other: sigmoid(z') scales the singular values. (The reference code's
    weighted combination differs: it mixes raw z's and uses the mix itself as the multiplier, its
    `get_mask` being the identity, i.e. without the sigmoid.)
    """
    a = torch.as_tensor(alpha, dtype=torch.float32).flatten()
    if len(a) != len(experts) or (a < 0).any():
        raise ValueError(f"alpha must hold {len(experts)} non-negative weights, got {a.tolist()}")
    a = a / a.sum() if a.sum() > 0 else torch.full_like(a, 1 / len(a))
    return {name: sum(w * e[name] for w, e in zip(a.tolist(), experts)) for name in experts[0]}


def cem_search(score_fn: Callable[[torch.Tensor], float | tuple], n_experts: int, population: int = 32,
               elite_ratio: float = 0.2, iters: int = 10, seed: int = 0, init: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Cross-entropy-method search for mixing weights alpha in [0, 1]^K that maximise score_fn(alpha).

    The search starts at `init` (uniform 1/K) with std 0.5 (half the range); each iteration samples
    `population` candidates clipped to [0, 1], keeps the best so far as candidate 0 (re-evaluated), and
    refits mean and std to the elites. Population and elite ratio are the reference's defaults; its
    few-shot evaluation script differs (50 iterations, per-layer, unnormalised coefficients): see
    docs/transformer2.md.

    Args:
        score_fn: alpha (K,) -> score, e.g. the mean log-likelihood of a few held-out examples under
            mix(experts, alpha). It may return a tuple (score, log_likelihood): tuples compare in order,
            so equal scores (e.g. task accuracy) are ranked by log-likelihood, as the reference does.
        n_experts: K.
        population: candidates per iteration (reference 32).
        elite_ratio: share of the population the distribution is refitted to (reference 0.2).
        iters: iterations; score_fn is called population * iters times.
        seed: seeds the sampling.
        init: initial mean (default uniform 1/K).

    Returns:
        The best alpha found, (K,), unnormalised (mix normalises).
    """
    g = torch.Generator().manual_seed(seed)
    n_elites = max(1, int(elite_ratio * population))
    mean = torch.full((n_experts,), 1 / n_experts) if init is None else torch.as_tensor(init, dtype=torch.float32)
    std = torch.full((n_experts,), 0.5)
    best = mean.clone()
    for _ in range(iters):
        pop = (mean + std * torch.randn(population, n_experts, generator=g)).clamp(0, 1)
        pop[0] = best  # re-evaluate the best so far: a noisy score cannot keep a lucky candidate forever
        scores = [score_fn(a) for a in pop]
        order = sorted(range(population), key=lambda i: scores[i], reverse=True)
        best = pop[order[0]].clone()
        elites = pop[order[:n_elites]]
        mean = elites.mean(0)
        if n_elites > 1:
            std = elites.std(0)
    return best


# ---------------------------------------------------------------------------- training experts

def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer | prompt) of each row, teacher-forced: the sum over the positions in `answer_mask`.

    Args:
        input_ids, attention_mask: (B, L) prompt + answer, right-padded.
        answer_mask: (B, L) 1 on the answer's tokens (never on position 0).

    Returns:
        ((B,) summed log-probs, (B, L-1, V) log-softmax of the next-token logits, for a KL term).
    """
    logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float(), -1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # position t predicts token t + 1
    return (picked * answer_mask[:, 1:]).sum(1), logp


def answer_kl(logp: torch.Tensor, ref_logp: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL(reference || policy) summed over the answer's positions, as the reference's KL term
    (`F.kl_div(policy, reference, log_target=True)`); inputs from `sequence_log_probs`."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * answer_mask[:, 1:]).sum(1)


def reinforce_step(optimizer: torch.optim.Optimizer, log_probs: torch.Tensor, rewards: torch.Tensor,
                   kl: torch.Tensor | None = None, kl_coef: float = 0.0, max_grad_norm: float = 1e-3,
                   baseline: bool = True) -> dict[str, float]:
    """One REINFORCE update of the z's: loss = -mean((r - b) * log p(answer)) + kl_coef * mean(kl).

    Sample the answers first (without gradients), score them with the task's reward, then compute
    `log_probs` with the expert applied factored, so that gradients reach z.

    Args:
        optimizer: over the z's, e.g. Adam(svf.parameters(), lr=2e-3) (the reference's lr).
        log_probs: (B,) log p of each sampled answer under the adapted model, with a graph into z.
        rewards: (B,) task success of each answer.
        kl: (B,) optional per-answer KL to the unadapted model (`answer_kl`); used when kl_coef > 0.
        kl_coef: KL coefficient (reference 0).
        max_grad_norm: gradient-norm clip over the optimised parameters (reference 1e-3).
        baseline: subtract the batch's mean reward (variance reduction; the reference uses raw rewards).

    Returns:
        Statistics: reward mean, loss, gradient norm before clipping.
    """
    rewards = torch.as_tensor(rewards, dtype=log_probs.dtype, device=log_probs.device)
    advantage = rewards - rewards.mean() if baseline else rewards
    loss = -(advantage * log_probs).mean()
    if kl is not None and kl_coef > 0:
        loss = loss + kl_coef * kl.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {"reward": rewards.mean().item(), "loss": loss.item(), "grad_norm": norm.item()}
