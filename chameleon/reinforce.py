"""REINFORCE for Transformer²'s SVF experts on the instruction task: the reward is the ROUGE-L of a sampled answer.

    cfg = Config.from_profile("smoke", task="instructions", regime="svf", objective="reinforce")
    result = train(cfg)                   # a run folder, as training.train writes: python -m chameleon reinforce
    adapted = load_trained(cfg, model)    # runs.load_trained, serving.Adapter.from_run: as any run

A step draws `cfg.batch_size` prompts (a new shuffle for every pass over them), samples one answer to
each with the expert's W' built once (no grad), scores it by its ROUGE-L F against the reference
(0-1), then computes log p(answer | prompt) with the expert applied factored, so that gradients
reach z, and makes one `reinforce_step` (below; the two ways `svf.SVFExperts` applies an expert).
The reference's settings (lr 2e-3, max_grad_norm 1e-3, temperature 1, KL 0) are the defaults of an
objective="reinforce" config; its batch (256) and steps (2,000) are far beyond a CPU
(config.REINFORCE_OVERRIDES), and `reinforce_step` subtracts the batch's mean reward where the
reference uses raw rewards.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chameleon.backbones import device as resolve_device, load_backbone
from chameleon.cache import write_atomic
from chameleon.config import Config, RunFailed
from chameleon.serve.decoding import decode, generate
from chameleon.serve.metrics import rouge_l, rouge_l_scores
from chameleon.adapters.model import Adapted, build
from chameleon.prepare import load_split_texts, prepare
from chameleon.regimes import OBJECTIVES
from chameleon.runs import finished, results_folder, run_dir, save_centroids, save_checkpoint
from chameleon.training import progress_bar


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


def reinforce(adapted: Adapted, tokenizer, prompts: list[str], references: list[str], optimizer: torch.optim.Optimizer,
              steps: int, batch_size: int, max_grad_norm: float = 1e-3, temperature: float = 1.0, max_new_tokens: int = 100,
              kl_coef: float = 0.0, seed: int = 0, max_prompt_tokens: int | None = None, progress: bool = True,
              reward: Callable[[list[str], list[str]], list[float]] = rouge_l_scores) -> list[dict]:
    """Train the selected SVF expert of `adapted` (z only) with REINFORCE; the backbone stays frozen and unchanged.

    Args:
        adapted: `build` of an `svf` (or `svf_experts`) config around the backbone; its `svf.selection`
            is the expert trained.
        tokenizer: the backbone's tokenizer.
        prompts, references: the task's prompts and their reference answers.
        optimizer: over the selected expert's z (the reference's: Adam, lr 2e-3); the caller keeps its state.
        steps, batch_size: updates, and answers sampled for each (one per prompt).
        max_grad_norm, kl_coef: the gradient clip and the KL coefficient (the KL is to the unadapted backbone).
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
    dev, eos, g = model.get_input_embeddings().weight.device, tokenizer.eos_token_id, torch.Generator().manual_seed(seed)
    ids = [tokenizer(p)["input_ids"][-max_prompt_tokens:] if max_prompt_tokens else tokenizer(p)["input_ids"]
           for p in prompts]
    order, history, start = [], [], time.perf_counter()
    adapted.eval()  # the backbone as it was loaded: no dropout in the sampling or the log-probs
    bar = progress_bar(range(steps), progress, desc="REINFORCE")
    for _ in bar:
        while len(order) < batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        # no grad: W' is built once for the step's sampling (svf.SVFExperts.weights)
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


# ---------------------------------------------------------------------------- a run

def report_paths(cfg: Config) -> list[Path]:
    """Where the run's summary is copied beside its profile's tables, to be committed as they are (run folders are
    not): results/<profile>/instructions/reinforce-seed<seed>.{md,json}."""
    stem = results_folder(cfg) / f"reinforce-seed{cfg.seed}"
    return [stem.with_suffix(".md"), stem.with_suffix(".json")]


def train(cfg: Config, model=None, tokenizer=None, progress: bool = True, command: str = "") -> dict:
    """Train cfg's SVF expert with REINFORCE on the instruction train split; returns the run's metrics.

    The run folder (runs.run_dir) holds what `training.train` writes: config.json, centroids.safetensors,
    checkpoint.safetensors (z and Adam's state) and metrics.json, written last; and report.md (`to_markdown`),
    copied with metrics.json to `report_paths`. A finished run is read back instead of retrained.
    Greedy ROUGE-L on the first cfg.n_generate validation prompts is measured three times: the
    unadapted backbone, the expert at its init (z = 0.1 + N(0, 0.01^2): W' is W up to that noise)
    and the trained expert (metrics rouge_l_unadapted, rouge_l_init and rouge_l).

    Args:
        cfg: an objective="reinforce" config; its seed reproduces the run.
        model, tokenizer: a backbone already loaded (it stays unchanged); None loads cfg.backbone.
        command: the command line, recorded in the report.
    """
    if not OBJECTIVES[cfg.objective].reward:
        raise ValueError(f"objective={cfg.objective!r} is trained by training.train (python -m chameleon train)")
    out = run_dir(cfg)
    if (done := finished(cfg)) is not None:
        return done
    dev = resolve_device(cfg.device)
    raw = {s: load_split_texts(cfg, s) for s in ("train", "validation")}
    start = time.perf_counter()
    if model is None:
        model, tokenizer = load_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir)
    model.to(dev)
    _, _, centroids = prepare(cfg, model, tokenizer, raw)  # stored as by `train`: serving routes prompts with them
    adapted = build(cfg, model).to(dev).eval()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    save_centroids(out, centroids)
    val = raw["validation"]
    n = min(cfg.n_generate, len(val["prompt"]))
    prompts, refs = val["prompt"][:n], val["response"][:n]
    unadapted = generate(Adapted(model, model.get_output_embeddings(), blocks_adapted=False), tokenizer, prompts, cfg)
    before = generate(adapted, tokenizer, prompts, cfg)
    params = [p for p in adapted.parameters() if p.requires_grad]  # the one expert's z, in the checkpoint's order
    init = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    history = reinforce(adapted, tokenizer, raw["train"]["prompt"], raw["train"]["response"], opt,
                        cfg.reinforce_steps, cfg.batch_size, max_grad_norm=cfg.max_grad_norm,
                        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef,
                        seed=cfg.seed, max_prompt_tokens=cfg.max_length, progress=progress)
    if not all(math.isfinite(h["loss"]) for h in history):
        raise RunFailed(f"REINFORCE diverged (losses {[h['loss'] for h in history]}); try a smaller --lr (now {cfg.lr})")
    after = generate(adapted, tokenizer, prompts, cfg)
    seconds = round(time.perf_counter() - start, 2)  # all of it: the backbone, three greedy evaluations, the training
    passes = math.ceil(cfg.reinforce_steps * cfg.batch_size / len(raw["train"]["prompt"]))  # over the train prompts
    save_checkpoint(out, adapted, opt, history, passes, len(history), seconds)
    result = {"config": cfg.to_dict(), "trainable_params": adapted.trainable(), "history": history, "seconds": seconds,
              "finished": True, **adapted.report(), "rouge_l": rouge_l(after, refs),
              "rouge_l_init": rouge_l(before, refs), "rouge_l_unadapted": rouge_l(unadapted, refs), "n": n,
              "z_change": max((p - p0).abs().max().item() for p, p0 in zip(params, init)),
              "train_prompts": len(raw["train"]["prompt"]), "device": str(dev), "command": command,
              "generations": [dict(prompt=p, reference=r, before=b, after=a)
                              for p, r, b, a in zip(prompts, refs, before, after)]}
    report, metrics = to_markdown(result), json.dumps(result, indent=2) + "\n"
    md, copy = report_paths(cfg)
    for path, text in ((out / "report.md", report), (md, report), (copy, metrics), (out / "metrics.json", metrics)):
        write_atomic(path, lambda tmp, text=text: Path(tmp).write_text(text))  # metrics.json last: the run is finished
    return result


def to_markdown(result: dict) -> str:
    """The run's report: the ROUGE-L table, the reward's course and every step (from its metrics.json)."""
    cfg, h = result["config"], result["history"]
    k = max(1, len(h) // 4)
    mean = lambda rows: sum(x["reward"] for x in rows) / len(rows)  # noqa: E731
    steps = [f"| {i + 1} | {x['reward']:.3f} | {x['loss']:.4f} | {x['grad_norm']:.3g} | {x['answer_tokens']:.1f} |"
             for i, x in enumerate(h)]
    return "\n".join([
        "# One SVF expert trained with REINFORCE (reward: ROUGE-L of a sampled answer)", "",
        f"`{result['command']}`", "",
        f"{cfg['backbone']}, profile {cfg['profile']}, seed {cfg['seed']}, {result['device']}, "
        f"{result['seconds']:.0f} s in all. {cfg['reinforce_steps']} steps of {cfg['batch_size']} answers, sampled at "
        f"temperature {cfg['temperature']} (at most {cfg['max_new_tokens']} new tokens) from {result['train_prompts']} "
        f"train prompts; Adam lr {cfg['lr']}, gradient clip {cfg['max_grad_norm']}, KL coefficient {cfg['kl_coef']}.", "",
        f"Greedy ROUGE-L (0-100) on the first {result['n']} validation prompts:", "",
        "| unadapted | expert at init | expert after REINFORCE |", "|---|---|---|",
        f"| {result['rouge_l_unadapted']:.2f} | {result['rouge_l_init']:.2f} | {result['rouge_l']:.2f} |", "",
        f"Reward (mean ROUGE-L F of a step's sampled answers, 0-1): {h[0]['reward']:.3f} at the first step, "
        f"{h[-1]['reward']:.3f} at the last; {mean(h[:k]):.3f} over the first {k} steps, {mean(h[-k:]):.3f} over "
        f"the last {k}; each step draws other prompts, and with {cfg['batch_size']} answers a step its mean is noisy. "
        f"The largest change of any z: {result['z_change']:.3g} (Adam moves each by about lr a step).", "",
        "| step | reward | loss | grad norm | answer tokens |", "|---|---|---|---|---|", *steps, ""])


# ---------------------------------------------------------------------------- the REINFORCE loss and step

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
