"""tiaoyu: train a small language model through its whole life, one command per stage."""

__version__ = "0.1.0"
