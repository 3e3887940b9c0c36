"""minilm: must a language model pay O(N^2) for attention? Every family, from scratch, measured."""
__version__ = "0.1.0"
