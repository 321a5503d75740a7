"""Probes: one per watched thing, all with one interface (:class:`~geomon.probes.base.Probe`), listed by a
:class:`~geomon.probes.plan.Plan` decided once at attach.

Each probe owns ``torchmetrics`` metrics (so DDP sync, ``.to()`` and checkpoints come free), knows its keys in
geomon's scheme (:mod:`geomon.keys`), arms its hooks only inside a measured step, and adds its values to a
:class:`~geomon.probes.base.Values` in ``compute`` (a collective).
"""

from geomon.probes.attention import AttentionProbe
from geomon.probes.base import Probe, Values
from geomon.probes.collapse import CollapseProbe
from geomon.probes.embedding import EmbeddingProbe
from geomon.probes.logit_map import LogitMapProbe
from geomon.probes.plan import Plan, PlanOptions, build_plan
from geomon.probes.spectral import ReparamProbe, SpectralProbe

__all__ = [
    "AttentionProbe",
    "CollapseProbe",
    "EmbeddingProbe",
    "LogitMapProbe",
    "Plan",
    "PlanOptions",
    "Probe",
    "ReparamProbe",
    "SpectralProbe",
    "Values",
    "build_plan",
]
