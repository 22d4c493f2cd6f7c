"""Optimizers built on the package's ops."""
from .twa import TWA

__all__ = ["TWA"]
