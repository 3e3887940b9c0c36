"""minilm: must a language model pay O(N^2) for attention? Every family, from scratch, measured."""
__version__ = "0.1.0"

from minilm.model import LM, LMConfig  # noqa: E402  (after __version__ so it is readable without numpy)

__all__ = ["LM", "LMConfig", "__version__"]
