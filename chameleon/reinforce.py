"""REINFORCE for Transformer²'s SVF experts on the instruction task: the reward is the ROUGE-L of a sampled answer.

    adapted = build(cfg.replace(regime="svf"), model)     # one SVF expert (model.SVFExperts)
    history = reinforce(adapted, tokenizer, prompts, references, steps=8, batch_size=4, max_new_tokens=16)
    python -m chameleon reinforce --profile smoke   # one expert; writes results/smoke/instructions/reinforce-seed0.*

A step draws `batch_size` prompts (a new shuffle for every pass over them), samples one answer to
each with the expert's W' built once (no grad), scores it by its ROUGE-L F against the reference
(0-1), then computes log p(answer | prompt) with the expert applied factored, so that gradients
reach z, and makes one `svf.reinforce_step` (the two ways `model.SVFExperts` applies an expert).
The reference's settings (lr 2e-3, max_grad_norm 1e-3, temperature 1, KL 0) are the defaults; its
batch (256) and steps (2,000) are far beyond a CPU, and `reinforce_step` subtracts the batch's mean
reward where the reference uses raw rewards.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from chameleon.backbones import device as resolve_device, load_backbone
from chameleon.cache import write_atomic
from chameleon.config import Config, RunFailed
from chameleon.generation import decode, generate, rouge_l, rouge_l_scores
from chameleon.model import Adapted, build
from chameleon.prepare import load_split_texts
from chameleon.svf import answer_kl, reinforce_step, sequence_log_probs
from chameleon.training import progress_bar

# steps and batch size per profile; any other profile gets the reference's, meant for a GPU
SETTINGS = {"smoke": dict(steps=8, batch_size=4), "cpu": dict(steps=24, batch_size=8)}
REFERENCE = dict(steps=2000, batch_size=256)


def pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer rows for `sequence_log_probs`: (input_ids, attention_mask,
    answer_mask), the answer mask 1 on the answer's tokens only (never the prompt or the padding)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention, answer = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        attention[i, :len(p) + len(a)] = 1
        answer[i, len(p):len(p) + len(a)] = 1
    return ids, attention, answer


def reinforce(adapted: Adapted, tokenizer, prompts: list[str], references: list[str], steps: int, batch_size: int,
              lr: float = 2e-3, max_grad_norm: float = 1e-3, temperature: float = 1.0, max_new_tokens: int = 100,
              kl_coef: float = 0.0, seed: int = 0, max_prompt_tokens: int | None = None, progress: bool = True,
              reward: Callable[[list[str], list[str]], list[float]] = rouge_l_scores) -> list[dict]:
    """Train the selected SVF expert of `adapted` (z only) with REINFORCE; the backbone stays frozen and unchanged.

    Args:
        adapted: `build` of an `svf` (or `svf_experts`) config around the backbone; its `svf.selection`
            is the expert trained.
        tokenizer: the backbone's tokenizer.
        prompts, references: the task's prompts and their reference answers.
        steps, batch_size: updates, and answers sampled for each (one per prompt).
        lr, max_grad_norm, kl_coef: Adam's learning rate, the gradient clip and the KL coefficient (the KL
            is to the unadapted backbone).
        temperature: of the sampling. The log-probs are the model's own (temperature 1): at another
            temperature the answers come from another policy than the one updated.
        max_new_tokens: answer length limit. An answer that stopped at EOS is scored with its EOS
            (stopping is a choice of the policy); its text is decoded without it.
        seed: the prompt order and the sampling (a CPU generator: the same answers on every device).
        max_prompt_tokens: a longer prompt keeps its last tokens, as `generation.generate` does.
        reward: (answers, references) -> a reward per answer; ROUGE-L F by default.

    Returns:
        Per step: reward (mean), loss, grad_norm, kl (when kl_coef > 0), answer_tokens (mean, EOS included)
        and seconds (since the start).
    """
    if not prompts or len(prompts) != len(references):
        raise ValueError(f"need as many references as prompts, got {len(prompts)} prompts, {len(references)} references")
    experts, model = adapted.svf, adapted.model
    if experts is None:
        raise ValueError("REINFORCE trains an SVF expert: build the adapted model from an svf or svf_experts config")
    z = list(experts.expert(experts.selection).values())
    optimizer = torch.optim.Adam(z, lr=lr)
    dev, eos, g = z[0].device, tokenizer.eos_token_id, torch.Generator().manual_seed(seed)
    ids = [tokenizer(p)["input_ids"][-max_prompt_tokens:] if max_prompt_tokens else tokenizer(p)["input_ids"]
           for p in prompts]
    order, history, start = [], [], time.perf_counter()
    adapted.eval()  # the backbone as it was loaded: no dropout in the sampling or the log-probs
    bar = progress_bar(range(steps), progress, desc="REINFORCE")
    for _ in bar:
        while len(order) < batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        # no grad: W' is built once for the step's sampling (model.SVFExperts.weights)
        answers = [decode(adapted, torch.tensor(ids[i]), max_new_tokens, eos, temperature=temperature, generator=g)
                   for i in batch]
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        rewards = torch.tensor(reward(texts, [references[i] for i in batch]))
        actions = [a + [eos] if len(a) < max_new_tokens else a for a in answers]
        input_ids, attention, mask = (t.to(dev) for t in pack([ids[i] for i in batch], actions, tokenizer.pad_token_id))
        kl = None
        if kl_coef > 0:
            with torch.no_grad():  # the reference policy: the unadapted backbone
                _, ref = sequence_log_probs(model, input_ids, attention, mask)
        with experts.svf.factored(model, experts.zs()):
            log_probs, logp = sequence_log_probs(model, input_ids, attention, mask)
        if kl_coef > 0:
            kl = answer_kl(logp, ref, mask)
        stats = reinforce_step(optimizer, log_probs, rewards, kl, kl_coef, max_grad_norm)
        if kl is not None:
            stats["kl"] = kl.mean().item()
        stats.update(answer_tokens=sum(map(len, actions)) / len(actions), seconds=time.perf_counter() - start)
        history.append(stats)
        bar.set_postfix(reward=f"{stats['reward']:.3f}")
    return history


# ---------------------------------------------------------------------------- the command line's run

def outputs(cfg: Config) -> dict[str, Path]:
    """results/<profile>/instructions/reinforce-seed<seed>.{safetensors,md,json}; the JSON, written last, marks a finished run."""
    stem = Path(cfg.results_dir) / cfg.profile / "instructions" / f"reinforce-seed{cfg.seed}"
    return {ext: stem.with_suffix(f".{ext}") for ext in ("safetensors", "md", "json")}


def run(cfg: Config, steps: int, batch_size: int, lr: float = 2e-3, max_grad_norm: float = 1e-3,
        temperature: float = 1.0, kl_coef: float = 0.0, force: bool = False, command: str = "") -> dict:
    """Train one SVF expert on cfg's instruction train split with REINFORCE and write its files (see `outputs`).

    Greedy ROUGE-L on the first cfg.n_generate validation prompts is measured three times: the
    unadapted backbone, the expert at its init (z = 0.1 + N(0, 0.01^2): W' is W up to that noise)
    and the trained expert. Nothing already there is overwritten unless `force`.
    """
    if cfg.task != "instructions":
        raise ValueError(f"REINFORCE is run on the instruction task (its reward is ROUGE-L), not task={cfg.task!r}")
    paths = outputs(cfg)
    if not force and (taken := [p for p in paths.values() if p.exists()]):
        raise ValueError(f"{taken[0]} exists; pass --force to overwrite it, or choose another --seed")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch size must be positive, got {steps} and {batch_size}")
    train, val = load_split_texts(cfg, "train"), load_split_texts(cfg, "validation")
    start = time.perf_counter()
    model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    dev = resolve_device(cfg.device)
    model.to(dev)
    adapted = build(cfg.replace(regime="svf"), model).to(dev).eval()
    experts = adapted.svf
    n = min(cfg.n_generate, len(val["prompt"]))
    prompts, refs = val["prompt"][:n], val["response"][:n]
    unadapted = generate(Adapted(model, model.get_output_embeddings(), blocks_adapted=False), tokenizer, prompts, cfg)
    before = generate(adapted, tokenizer, prompts, cfg)
    init = {name: z.detach().clone() for name, z in experts.expert(0).items()}
    history = reinforce(adapted, tokenizer, train["prompt"], train["response"], steps, batch_size, lr=lr,
                        max_grad_norm=max_grad_norm, temperature=temperature, max_new_tokens=cfg.max_new_tokens,
                        kl_coef=kl_coef, seed=cfg.seed, max_prompt_tokens=cfg.max_length)
    if not all(math.isfinite(h["loss"]) for h in history):
        raise RunFailed(f"REINFORCE diverged (losses {[h['loss'] for h in history]}); try a smaller --lr")
    after = generate(adapted, tokenizer, prompts, cfg)
    result = {"command": command, "device": str(dev), "seconds": time.perf_counter() - start,
              "settings": dict(steps=steps, batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm,
                               temperature=temperature, kl_coef=kl_coef, train_prompts=len(train["prompt"])),
              "rouge_l": {"unadapted": rouge_l(unadapted, refs), "before": rouge_l(before, refs),
                          "after": rouge_l(after, refs), "n": n},
              "z_change": max((z - init[name]).abs().max().item() for name, z in experts.expert(0).items()),
              "history": history, "config": cfg.to_dict(),
              "generations": [dict(prompt=p, reference=r, before=b, after=a)
                              for p, r, b, a in zip(prompts, refs, before, after)]}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: z.detach().cpu().contiguous() for name, z in experts.expert(0).items()}
    write_atomic(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata={"backbone": cfg.backbone,
                                                                                      "targets": "mlp"}))
    write_atomic(paths["md"], lambda tmp: Path(tmp).write_text(to_markdown(result)))
    write_atomic(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


def to_markdown(result: dict) -> str:
    s, r, h, cfg = result["settings"], result["rouge_l"], result["history"], result["config"]
    k = max(1, len(h) // 4)
    mean = lambda rows: sum(x["reward"] for x in rows) / len(rows)  # noqa: E731
    steps = [f"| {i + 1} | {x['reward']:.3f} | {x['loss']:.4f} | {x['grad_norm']:.3g} | {x['answer_tokens']:.1f} |"
             for i, x in enumerate(h)]
    return "\n".join([
        "# One SVF expert trained with REINFORCE (reward: ROUGE-L of a sampled answer)", "",
        f"`{result['command']}`", "",
        f"{cfg['backbone']}, profile {cfg['profile']}, seed {cfg['seed']}, {result['device']}, "
        f"{result['seconds']:.0f} s in all. {s['steps']} steps of {s['batch_size']} answers, sampled at temperature "
        f"{s['temperature']} (at most {cfg['max_new_tokens']} new tokens) from {s['train_prompts']} train prompts; "
        f"Adam lr {s['lr']}, gradient clip {s['max_grad_norm']}, KL coefficient {s['kl_coef']}.", "",
        f"Greedy ROUGE-L (0-100) on the first {r['n']} validation prompts:", "",
        "| unadapted | expert at init | expert after REINFORCE |", "|---|---|---|",
        f"| {r['unadapted']:.2f} | {r['before']:.2f} | {r['after']:.2f} |", "",
        f"Reward (mean ROUGE-L F of a step's sampled answers, 0-1): {h[0]['reward']:.3f} at the first step, "
        f"{h[-1]['reward']:.3f} at the last; {mean(h[:k]):.3f} over the first {k} steps, {mean(h[-k:]):.3f} over "
        f"the last {k}; each step draws other prompts, and with {s['batch_size']} answers a step its mean is noisy. "
        f"The largest change of any z: {result['z_change']:.3g} (Adam moves each by about lr a step).", "",
        "| step | reward | loss | grad norm | answer tokens |", "|---|---|---|---|---|", *steps, ""])
