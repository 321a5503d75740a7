"""``torchmetrics.Metric`` classes over the functional statistics: streaming, DDP sync, ``.to()`` and reset for free.

No math lives here: ``update`` delegates to ``geomon.functional._x_update`` and ``compute`` to ``_x_compute``.
"""

from geomon.metrics.alpha_req import AlphaReQ
from geomon.metrics.attention_entropy import AttentionEntropy
from geomon.metrics.neural_collapse import NeuralCollapse
from geomon.metrics.rankme import RankMe
from geomon.metrics.spectral_norm import SpectralNorm

__all__ = ["AlphaReQ", "AttentionEntropy", "NeuralCollapse", "RankMe", "SpectralNorm"]
