"""ItemSage: one multi-modal product embedding for every shopping surface."""

__version__ = "0.1.0"
