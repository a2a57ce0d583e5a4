"""Würstchen: train the three stages of the Würstchen text-to-image model (arXiv 2306.00637)."""

__version__ = "0.1.0"
