"""Low-rank compression: randomized SVD of Linear / Conv2d weights, rank by a fixed rank,
an energy fraction or the effective rank; layers replaced by two thin factors."""
from .lowrank import CompressionReport, LayerReport, choose_rank, compress, effective_rank

__all__ = ["CompressionReport", "LayerReport", "choose_rank", "compress", "effective_rank"]
