"""A trained run as standard PEFT LoRA adapters, loadable without the kit (`chameleon.serve.load_export`).

    python -m chameleon export --run results/cpu/lm/runs/<run> --format peft OUT
    Adapter.from_run(run).export_peft("OUT")

- `lora`, `lora_matched`, `lora_full`: one PEFT adapter (adapter_config.json + adapter_model.safetensors)
  holding the head's and the blocks' A and B. PEFT scales B A by lora_alpha / r; the kit scales it by
  `LoRA.scaling` (alpha / r, or alpha alone in the authors' flavour), so lora_alpha = scaling * r.
- `chameleon`, `chameleon_full`: the hypernetwork evaluated at each training cluster's mean conditioning
  vector (the mean of the cluster's `Split.cond_emb`: full text, prefix or excluding targets, as the run
  was conditioned) gives one head update per cluster: one named adapter per cluster (cluster_<c>/, the
  blocks' LoRA repeated in each for `chameleon_full`), and routing.json: the training centroids and the
  rule that sends a prompt to its cluster (`load_export.route`). What stays outside this form: the
  conditioning of a group of new prompts by their own batch mean (`Adapter.generate`), which needs the
  hypernetwork itself.
- `lora_experts`: one named adapter per expert (expert_<k>/), routed as the `classifier` dispatch routes a
  prompt: the nearest prompt centroid of its first prefix_tokens tokens (the instruction's prompt).

Beside the adapters: base/ (the backbone and tokenizer in Hugging Face form, where the kit converted or built
them: SmolLM2 from GGUF, GPT-2's tokenizer from tiktoken, gpt2-arch's random weights), export.json (the run,
the regime, the adapters, the sha256 of the backbone's weights, which `load_export.load` checks) and
load_export.py. The LoRA on a head tied to the input embeddings adapts the head alone: do not merge it into
the model (merging would change the tied input embeddings too).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from chameleon.backbones import CONVERTED, load_backbone
from chameleon.adapters.lora import LoRA
from chameleon.serve.load_export import weights_sha256
from chameleon.prepare import prepare, prompt_prefix
from chameleon.regimes import LEVELS, PROTOCOLS, REGIMES

EXPORT = "export.json"


def export_peft(adapter, out: str | Path, force: bool = False) -> Path:
    """Write `adapter`'s run (a `serving.Adapter`) to the folder `out` as PEFT adapters; returns `out`.

    Args:
        force: replace an earlier export in `out` (a folder holding export.json); a folder that is not
            an export is never replaced.
    """
    out = Path(out)
    check_target(out, force)
    cfg, adapted = adapter.cfg, adapter.adapted
    if why := unexportable(cfg.regime, cfg.cond_level):
        raise ValueError(f"a {cfg.regime} run cannot be exported as PEFT LoRA adapters: {why}")
    updates, routing = _head_updates(adapter)  # {adapter name: (A, B) of the head}, and how prompts pick one
    base, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=adapter.cache_dir)
    blocks = {name: m for name, m in adapted.model.named_modules() if isinstance(m, LoRA)}
    head_name = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
    scalings = {m.scaling for m in blocks.values()} | {adapted.head.scaling}
    ranks = {m.A.shape[0] for m in blocks.values()} | {A.shape[0] for A, _ in updates.values()}
    if len(scalings) != 1 or len(ranks) != 1:
        raise ValueError(f"the run's adapters differ in rank {sorted(ranks)} or scaling {sorted(scalings)}; "
                         "one PEFT LoraConfig cannot hold them")
    rank, scaling = ranks.pop(), scalings.pop()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))  # renamed to `out` once complete
    try:
        base_path = None
        if cfg.backbone in CONVERTED:  # no Hugging Face copy of it exists elsewhere
            base_path = "base"
            base.save_pretrained(tmp / base_path)
            tokenizer.save_pretrained(tmp / base_path)
        meta = {"format": "peft", "run": str(adapter.run) if adapter.run else None, "regime": cfg.regime,
                "protocol": cfg.protocol, "conditioning": cfg.conditioning if REGIMES[cfg.regime].conditioned else None,
                "adapters": list(updates), "lora_alpha": scaling * rank, "r": rank,
                "base": {"path": base_path, "name_or_path": cfg.backbone, "sha256": weights_sha256(base)}}
        _write_adapters(base, tmp, updates, blocks, head_name, rank, scaling,
                        str((out / base_path).resolve()) if base_path else cfg.backbone)
        if routing is not None:
            (tmp / "routing.json").write_text(json.dumps(routing) + "\n")
        (tmp / EXPORT).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copy(Path(__file__).with_name("load_export.py"), tmp / "load_export.py")
        if out.exists():  # an earlier export, and --force: check_target said so
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left behind when something above failed
    return out


def unexportable(regime: str, cond_level: str = "batch") -> str:
    """Why a regime's run has no PEFT LoRA form ("": it has one)."""
    row = REGIMES[regime]
    if row.conditioned and LEVELS[cond_level].evaluates_per_line:
        return (f"cond_level={cond_level!r} generates one adapter per input line, from that line alone; PEFT holds a "
                "fixed set of adapters chosen by name, so there is no set to write: serve the run with "
                "`python -m chameleon serve` (one group per prompt)")
    if row.svf_blocks:
        return ("SVF rescales the singular values of every MLP matrix, a full-rank change that no LoRA adapter holds; "
                "it would need the adapted matrices U diag(S sigmoid(z)) Vh saved as a whole model per expert "
                "(or an SVF adapter type in PEFT); serve it with `python -m chameleon generate` or `serve`")
    if not row.trains:
        return "it trains no adapter: its model is the backbone itself (save_pretrained it as it is)"
    return ""


def check_target(out: Path, force: bool) -> None:
    """Refuse a folder that holds anything but an earlier export, and an earlier export without force."""
    if not out.exists():
        return
    if not (out / EXPORT).is_file():
        raise ValueError(f"{out} exists and is not an export of the kit (no {EXPORT}); choose a new folder")
    if not force:
        raise ValueError(f"{out} holds an earlier export; pass --force (force=True) to replace it, or choose a new folder")


def _head_updates(adapter) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """{adapter name: the head's (A, B)} and the routing of prompts to them (None for one adapter)."""
    cfg, adapted, head = adapter.cfg, adapter.adapted, adapter.adapted.head
    if isinstance(head, LoRA):
        return {"default": (head.A, head.B)}, None
    experts = adapted.experts
    if experts is not None:  # LoRA experts: the classifier dispatch's prompt centroids
        if experts.prompt_centroids is None:
            raise ValueError(f"{adapter.run} stores no prompt centroids; retrain it with this version of the kit")
        names = [f"expert_{k}" for k in range(experts.k)]
        updates = {n: (e.A, e.B) for n, e in zip(names, experts.experts)}
        return updates, _routing(adapter, experts.prompt_centroids, names, prompt_prefix(cfg))
    train, _, centroids = prepare(cfg, adapted.model, adapter.tokenizer)  # seeded: the clusters of training
    names = [f"cluster_{c}" for c in range(len(centroids))]
    conds = torch.stack([train.cond_emb[torch.from_numpy(train.labels == c)].mean(0) for c in range(len(centroids))])
    with torch.no_grad():
        A, B = head.generate_adapter(conds.to(head.base.weight))
    return {n: (A[c], B[c]) for c, n in enumerate(names)}, _routing(adapter, torch.from_numpy(centroids), names,
                                                                     cfg.route_prefix)


def _routing(adapter, centroids: torch.Tensor, names: list[str], prefix: int | None) -> dict:
    """What `load_export.route` needs to send a prompt where `Adapter` would (serving.prompt_embeddings)."""
    cfg = adapter.cfg
    return {"rule": "nearest centroid (Euclidean) of the prompt's L2-normalised mean input token embedding",
            "max_length": cfg.max_length, "count_padding": PROTOCOLS[cfg.protocol].embeds_padding,
            "pad_token_id": adapter.tokenizer.pad_token_id, "prefix": prefix, "adapters": names,
            "centroids": centroids.float().tolist()}


@torch.no_grad()
def _write_adapters(base, folder: Path, updates: dict, blocks: dict[str, LoRA], head_name: str, rank: int,
                    scaling: float, base_name: str) -> None:
    """One PEFT adapter per entry of `updates` (head A, B), each with the same block LoRAs."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=scaling * rank, target_modules=[head_name, *blocks], lora_dropout=0.0,
                        init_lora_weights=False)
    base.name_or_path = base_name  # PEFT records it in adapter_config.json (AutoPeftModelForCausalLM loads it)
    with warnings.catch_warnings():  # PEFT fixes fan_in_fan_out per layer type and warns about the tied head
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|fan_in_fan_out).*")
        model = None
        for name, (A, B) in updates.items():
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            for module_name, (a, b) in {head_name: (A, B), **{n: (m.A, m.B) for n, m in blocks.items()}}.items():
                layer = model.base_model.model.get_submodule(module_name)
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
        # the head's base weight is the tied input embedding: never copied into the adapter files
        model.save_pretrained(folder, save_embedding_layers=False)
