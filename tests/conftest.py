import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel


@pytest.fixture
def tiny_gpt2():
    """A 2-layer GPT-2 with GPT-2's real vocabulary (50,257) and Conv1D blocks, seeded."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
