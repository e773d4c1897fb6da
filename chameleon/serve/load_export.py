"""Load a PEFT export of the kit with torch, transformers and peft alone: this file never imports the kit,
and `export` copies it into every export folder as load_export.py.

    python OUT/load_export.py OUT "The history of Rome" "Photosynthesis is"   # greedy answers

    import sys; sys.path.insert(0, "OUT")
    from load_export import load, route
    model, tokenizer, routing = load("OUT")
    names = route(model, tokenizer, prompts, routing)         # chameleon / experts exports: each prompt's adapter
    model.generate(**enc, adapter_names=names)                 # PEFT applies a different adapter to each row

An export folder holds export.json (what was exported, and the sha256 of the backbone's weights),
base/ (the backbone and its tokenizer, where the kit converted or built them), and either one PEFT
adapter (adapter_config.json + adapter_model.safetensors: `lora`, `lora_full`, ...) or one adapter per
cluster in <name>/ subfolders plus routing.json (`chameleon`, `chameleon_full`): how a prompt picks its
adapter, as the kit routes it (the nearest training centroid of the prompt's mean token embedding).
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes, in name order (a tied weight counted once):
    the same backbone gives the same hash however it was saved or loaded."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load(out: str | Path, device: str = "cpu"):
    """(PeftModel with every adapter of the export loaded, tokenizer, routing dict or None).

    Raises ValueError when the backbone's weights are not those the adapters were trained on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    meta = json.loads((out / "export.json").read_text())
    base = out / meta["base"]["path"] if meta["base"]["path"] else meta["base"]["name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if (found := weights_sha256(model)) != meta["base"]["sha256"]:
        raise ValueError(f"the backbone loaded from {base} is not the one the adapters were trained on "
                         f"(weights sha256 {found[:12]}..., the export expects {meta['base']['sha256'][:12]}...); "
                         f"load the base/ folder of the export, or export the run again")
    names = meta["adapters"]
    with warnings.catch_warnings():  # the head is tied to the input embeddings: PEFT warns about merging it
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        first = out if names == ["default"] else out / names[0]
        model = PeftModel.from_pretrained(model, first, adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(out / name, adapter_name=name)
    routing = json.loads((out / "routing.json").read_text()) if (out / "routing.json").is_file() else None
    return model.to(device).eval(), tokenizer, routing


@torch.no_grad()
def route(model, tokenizer, prompts: list[str], routing: dict) -> list[str]:
    """The adapter of each prompt: the centroid nearest its embedding, which is the L2-normalised mean of
    the input token embeddings of its last max_length tokens (right-padded to max_length and padding
    counted when routing["count_padding"], as under the authors' protocol; only the first `prefix` tokens
    when routing["prefix"] is set)."""
    L, wte = routing["max_length"], model.get_input_embeddings().weight.float()
    rows = []
    for text in prompts:
        ids = tokenizer(text)["input_ids"][-L:]
        if routing["count_padding"]:
            ids = ids + [routing["pad_token_id"]] * (L - len(ids))
        if routing["prefix"]:
            ids = ids[:routing["prefix"]]
        rows.append(F.normalize(wte[torch.tensor(ids, device=wte.device)].mean(0), dim=0))
    centroids = torch.tensor(routing["centroids"], dtype=torch.float64)
    emb = torch.stack(rows).double().cpu()
    nearest = ((centroids * centroids).sum(1) - 2 * emb @ centroids.T).argmin(1)  # ||x||^2 is the same for all
    return [routing["adapters"][i] for i in nearest.tolist()]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python load_export.py EXPORT_DIR PROMPT [PROMPT ...]", file=sys.stderr)
        return 2
    model, tokenizer, routing = load(argv[0])
    prompts = argv[1:]
    names = route(model, tokenizer, prompts, routing) if routing else None
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = {"adapter_names": names} if names else {}
    out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    for i, prompt in enumerate(prompts):
        answer = tokenizer.decode(out[i, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(f"[{names[i] if names else 'adapter'}] {prompt} -> {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
