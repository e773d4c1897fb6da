"""ChamaleonLLM reproducibility kit: batch-aware dynamic low-rank adaptation, reproduced and audited."""
from chameleon.config import Config

__all__ = ["Config"]
