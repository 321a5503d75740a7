"""Probes: the state a monitor keeps per watched thing, fed with captured tensors and turned into logged values.

Each probe owns ``torchmetrics`` metrics (so DDP sync, ``.to()`` and checkpoints come free), knows its keys in
geomon's scheme, and returns ``(scalars, details)`` from ``compute``: 0-d tensors to log as scalars, and vectors
(per head, spectra) to show as media.
"""

from geomon.probes.attention import AttentionProbe
from geomon.probes.collapse import CollapseProbe
from geomon.probes.embedding import EmbeddingProbe
from geomon.probes.spectral import SpectralProbe

__all__ = ["AttentionProbe", "CollapseProbe", "EmbeddingProbe", "SpectralProbe"]
