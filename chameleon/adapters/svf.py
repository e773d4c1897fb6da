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
    svf.weight(name, z)              # W' itself, built once for evaluation (SVFExperts)

`SVFExperts` (below) holds the experts' z and applies them to a model in exactly these two ways.

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
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from chameleon.adapters.experts import Experts
from chameleon.cache import write_atomic
from chameleon.config import Config

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


class SVFExperts(Experts):
    """Transformer²'s SVF on a frozen body: K vectors z (one per expert) over one cached SVD.

    Expert k turns every adapted matrix W = U diag(S) Vh into U diag(S sigmoid(z_k)) Vh * sum S / sum(S
    sigmoid(z_k)) (`svf.SVF`). The model's own weights are never touched. Two ways to apply it: with
    gradients on (training z) or while CEM scores a few shots, each layer computes x W'^T factored
    (svf.SVF.factored, about 2x cheaper a step than rebuilding every W'; benchmarks/bench_svf.py);
    otherwise W' is built once per selection and the body runs on it through torch.func.functional_call.
    """

    def __init__(self, cfg: Config, model: nn.Module, k: int):
        super().__init__(cfg, k)
        self.svf = SVF(decompose(model, "mlp", cfg.cache_dir))
        self.names = self.svf.names
        prefix = model.base_model_prefix + "."
        self.keys = {n: (n[len(prefix):] if n.startswith(prefix) else n) + ".weight" for n in self.names}
        for key in self.keys.values():  # a name that missed the body would be ignored by functional_call: refuse it
            model.base_model.get_parameter(key)
        self.conv1d = {n: isinstance(model.get_submodule(n), Conv1D) for n in self.names}
        self.dtype = model.get_submodule(self.names[0]).weight.dtype
        self.experts = nn.ModuleList()
        for j in range(k):  # the reference's init, 0.1 + N(0, 0.01^2), drawn per expert on the CPU
            g = torch.Generator().manual_seed(cfg.seed * 1000 + j)
            self.experts.append(nn.ParameterDict({
                SVF.slot(n): nn.Parameter((0.1 + 0.01 * torch.randn(self.svf[n].S.shape, generator=g))
                                                  .to(self.svf[n].S.device)) for n in self.names}))
        self._weights: dict = {}  # hash of the selected z's -> W', built without gradients

    def expert(self, k: int) -> dict[str, torch.Tensor]:
        """Expert k as {layer name: z} (the trained Parameters themselves)."""
        return {n: self.experts[k][SVF.slot(n)] for n in self.names}

    def zs(self) -> dict[str, torch.Tensor]:
        """The selected expert's z, or the mixture of a CEM selection."""
        if isinstance(self.selection, int):
            return self.expert(self.selection)
        return mix([self.expert(k) for k in range(self.k)], list(self.selection))

    def body(self, model: nn.Module, **kwargs):
        """model.base_model(**kwargs) with the selected expert applied."""
        if torch.is_grad_enabled() or self.searching:
            with self.svf.factored(model, self.zs()):
                return model.base_model(**kwargs)
        return functional_call(model.base_model, self.weights(), args=(), kwargs=kwargs)

    def _build(self, zs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.keys[n]: (w.T if self.conv1d[n] else w).to(self.dtype)
                for n, w in ((n, self.svf.weight(n, z)) for n, z in zs.items())}

    def weights(self) -> dict[str, torch.Tensor]:
        """{body parameter name: W'} for the current selection, in the layers' orientation and dtype. Built
        without gradients, it is kept until a z changes (the key hashes the selected z's bytes: version counters
        would not do, a fused optimizer updates in place without bumping them); with gradients on, built anew
        (its graph is the caller's)."""
        zs = self.zs()
        if torch.is_grad_enabled():
            return self._build(zs)
        key = hashlib.blake2b(b"".join(z.detach().cpu().numpy().tobytes() for z in zs.values())).hexdigest()
        if key not in self._weights:
            if len(self._weights) >= self.k:
                self._weights.clear()
            self._weights[key] = self._build(zs)
        return self._weights[key]
