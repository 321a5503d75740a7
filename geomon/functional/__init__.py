"""Pure-torch metric functions: the specification, the CPU path and the test oracle.

Every metric is split into ``_x_update(...) -> statistics`` (sums that add across batches and processes) and
``_x_compute(statistics) -> values``; the public ``x(...)`` does both.
"""

from geomon.functional._common import GeomonWarning
from geomon.functional.alpha_req import alpha_req
from geomon.functional.attention_entropy import attention_entropy
from geomon.functional.entropy_bound import entropy_lower_bound
from geomon.functional.neural_collapse import neural_collapse
from geomon.functional.rankme import rankme
from geomon.functional.spectral_norm import spectral_norm

__all__ = [
    "GeomonWarning",
    "alpha_req",
    "attention_entropy",
    "entropy_lower_bound",
    "neural_collapse",
    "rankme",
    "spectral_norm",
]
