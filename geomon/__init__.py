"""geomon: watch the geometry of neural networks while they train."""

from geomon import functional, metrics
from geomon.functional import GeomonWarning
from geomon.monitor import Monitor

__version__ = "0.1.0.dev0"

__all__ = ["GeomonCallback", "GeomonWarning", "Monitor", "__version__", "functional", "metrics"]


def __getattr__(name: str):
    if name == "GeomonCallback":  # imported on use: `import geomon` must not import Lightning
        from geomon.callback import GeomonCallback

        return GeomonCallback
    raise AttributeError(f"module 'geomon' has no attribute {name!r}")
