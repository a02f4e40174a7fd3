"""The metamtl version (a leaf module: saved in checkpoints, read by setup.py)."""
__version__ = "0.1.0"
