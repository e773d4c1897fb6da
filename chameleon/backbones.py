"""Backbones: one function, `load_backbone(name)`, returns (model, tokenizer).

- "smollm2": the embedded SmolLM2-135M-Instruct. Its GGUF file is converted once (9-15 s on 2 cores)
  and saved as an fp32 safetensors copy under data/cache/models, keyed by the GGUF file's
  hash; later loads read that copy (well under 2 s).
- "gpt2-arch": GPT-2 small's exact architecture, randomly initialised from the seed, with
  GPT-2's exact tokenizer: structural work (parameter counts) where GPT-2 weights are
  unreachable. "gpt2-tiny" is a 2-layer version of it for unit tests.
- anything else: a hub id ("gpt2") or a local directory, through AutoModelForCausalLM.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from chameleon.assets import ASSETS, hub_reachable
from chameleon.config import ROOT

# GPT-2's pre-tokenisation regex (from its encoder.py); tiktoken's file holds only the merges.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS = "<|endoftext|>"
CONVERTED = ("smollm2", "gpt2-arch", "gpt2-tiny")  # built or converted by the kit: no Hugging Face copy elsewhere
OFFLINE_HINT = ("offline, use the embedded default backbone 'smollm2' (SmolLM2-135M) or 'gpt2-arch' "
                "(GPT-2's architecture, random weights); `python -m chameleon doctor` shows what is installed")


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's exact BPE tokenizer, built from the gpt2.tiktoken file that openai-whisper ships.
    A new object each call (`own_copy`), from a conversion done once per process."""
    return own_copy(_gpt2_built())


@functools.cache  # the conversion of 50k merges takes about a second; every gpt2-tiny run of the tests needs it
def _gpt2_built() -> PreTrainedTokenizerFast:
    converter = TikTokenConverter(vocab_file=str(ASSETS["gpt2-bpe"].require()), pattern=GPT2_PATTERN,
                                  extra_special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token=EOS, eos_token=EOS,
                                  unk_token=EOS, pad_token=EOS, model_max_length=1024)
    assert tok.eos_token_id == 50256, "gpt2.tiktoken did not give GPT-2's vocabulary"
    return tok


@functools.cache  # keyed by the converted copy's folder, whose name holds the GGUF file's hash
def _pretrained_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(folder)


def own_copy(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A new tokenizer whose settings (special tokens, padding and truncation sides, ...) are its caller's own,
    sharing `tok`'s backend: the vocabulary and merges, which the kit never changes and whose copy costs 0.15 s,
    most of loading a tiny test model. So tokens added to one (`add_tokens`) are added to both, and like one
    tokenizer, the two are for one thread at a time."""
    new = copy.copy(tok)
    new.__dict__.update((k, copy.deepcopy(v)) for k, v in tok.__dict__.items() if k != "_tokenizer")
    return new


def load_backbone(name: str, seed: int = 0, cache_dir: Path | None = None):
    """Return (model, tokenizer) in eval mode, float32, on the CPU; the caller moves the model.

    Args:
        name: "smollm2", "gpt2-arch", "gpt2-tiny", a hub id or a local directory.
        seed: initialises the random weights of "gpt2-arch" / "gpt2-tiny".
        cache_dir: where the converted SmolLM2 copy lives (default data/cache).
    """
    cache_dir = Path(cache_dir or ROOT / "data" / "cache")
    if name == "smollm2":
        model, tok = _load_smollm2(cache_dir)
    elif name in ("gpt2-arch", "gpt2-tiny"):
        torch.manual_seed(seed)
        config = GPT2Config() if name == "gpt2-arch" else GPT2Config(n_layer=2, n_embd=64, n_head=2)
        with torch.device("meta"):  # built empty, then initialised once by GPT-2's rules (not by torch's first)
            model = GPT2LMHeadModel(config)
        model, tok = model.to_empty(device="cpu"), gpt2_tokenizer()
        model.init_weights()
    else:
        model, tok = _load_pretrained(name)
    if tok.pad_token is None:  # GPT-2 has none; both the paper and PEFT pad with EOS
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model.float().eval(), tok


def _load_pretrained(name: str):
    if Path(name).exists():
        try:
            return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(f"backbone {name!r} is a path but holds no loadable causal LM ({err}); point at a "
                             f"directory written by save_pretrained, or {OFFLINE_HINT}") from None
    # HF_HUB_OFFLINE=1 is the user's way to use models already in the Hugging Face cache.
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        raise ValueError(f"backbone {name!r} is not a local directory and the Hugging Face hub is unreachable "
                         f"(set HF_HUB_OFFLINE=1 if it is in your Hugging Face cache); {OFFLINE_HINT}")
    try:
        return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ValueError(f"could not load backbone {name!r} ({err}); use a hub id like 'gpt2', a local "
                         f"directory, or {OFFLINE_HINT}") from None


def _load_smollm2(cache_dir: Path):
    gguf = ASSETS["smollm2"].require()
    folder = cache_dir / "models" / f"smollm2-{_sha256(gguf)[:16]}"
    if (folder / "model.safetensors").is_file():
        try:
            return AutoModelForCausalLM.from_pretrained(folder), own_copy(_pretrained_tokenizer(folder))
        except Exception as err:  # a truncated or damaged copy: it is only a cache, so convert again
            warnings.warn(f"the converted SmolLM2 copy in {folder} is unreadable ({type(err).__name__}: {err}); "
                          f"converting the GGUF file again", stacklevel=2)
            shutil.rmtree(folder, ignore_errors=True)
    _convert_gguf(gguf, folder)
    return AutoModelForCausalLM.from_pretrained(folder), own_copy(_pretrained_tokenizer(folder))


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and save it as fp32 safetensors (written to a temp dir, then renamed)."""
    import gguf as gguf_py
    from unittest import mock

    # transformers asks gguf for the same tensor-name table once per module (397 times for SmolLM2), and each
    # build takes ~18 ms: a third of the conversion. The table depends on its two arguments only. It also
    # parses the file's metadata (the 49k-token vocabulary, in Python) three times, for the config, the weights
    # and the tokenizer: one read-only reader serves all three.
    with (mock.patch.object(gguf_py, "get_tensor_name_map", functools.cache(gguf_py.get_tensor_name_map)),
          mock.patch.object(gguf_py, "GGUFReader", functools.cache(gguf_py.GGUFReader))):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still claims to be quantised; its weights are fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    stat = Path(path).stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


# Every SmolLM2 load names its converted copy by the GGUF's hash (98 MB: ~0.2 s), so it is hashed once per
# process; size and mtime are in the key, so a file replaced or touched since is hashed again.
@functools.cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' but torch sees no Apple GPU; use device='auto' or 'cpu'")
    return torch.device(name)
