"""geomon: watch the geometry of neural networks while they train."""

from geomon import functional, metrics
from geomon.functional import GeomonWarning
from geomon.monitor import Monitor

__version__ = "0.1.0.dev0"

__all__ = ["GeomonWarning", "Monitor", "__version__", "functional", "metrics"]
