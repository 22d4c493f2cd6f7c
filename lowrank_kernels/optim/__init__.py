"""Optimizers built on the package's ops."""
from .fngd import FNGD
from .kfac import KFAC
from .seng import SENG
from .twa import TWA

__all__ = ["FNGD", "KFAC", "SENG", "TWA"]
