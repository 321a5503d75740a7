"""geomon's key scheme, the one place it is spelled: every logged name is ``geomon/<family>/<target>``.

``family`` says what was measured (``attention/entropy``, ``rankme``, ``nc/nc1``, ``spectral/sigma``, ...), and
``target`` what it was measured on: a module path of the unwrapped model (``blocks.0.attn``), a probe name
(``lm_head.input``, a tensor handed to :meth:`geomon.Monitor.observe`) or an alert rule. Targets never contain ``/``,
so a key splits at its last ``/``.

Example:
    >>> key(ENTROPY_NORMALIZED, "blocks.0.attn")
    'geomon/attention/entropy_normalized/blocks.0.attn'
    >>> split("geomon/nc/nc1/lm_head.input")
    ('nc/nc1', 'lm_head.input')
    >>> pattern(RANKME)
    'geomon/rankme/*'
"""

from __future__ import annotations

ROOT = "geomon/"

ENTROPY = "attention/entropy"  #: mean attention entropy (nats) over batch, heads and valid query rows
ENTROPY_NORMALIZED = "attention/entropy_normalized"  #: mean of H / log n over rows with n >= 2 keys
MAX_LOGIT = "attention/max_logit"  #: largest attention logit
ATTENTION_FAMILIES = (ENTROPY, ENTROPY_NORMALIZED, MAX_LOGIT)
RANKME = "rankme"  #: effective rank of an embedding window (METRICS.md §1)
RANKME_COV = "rankme_cov"  #: RankMe of the centred covariance eigenvalues of the same window (METRICS.md §1)
ALPHA_REQ = "alpha_req"  #: eigenspectrum decay of an embedding window (METRICS.md §2)
SIGMA = "spectral/sigma"  #: σ(W) of a chosen weight (σReparam layers: of the applied γ W / σ(W))
STABLE_RANK = "spectral/stable_rank"  #: |W|_F² / σ(W)² (σReparam layers: of the applied weight, the same ratio)
LOGIT_SIGMA = "spectral/logit_sigma"  #: largest σ(W_Q,hᵀ W_K,h)·scale over an attention layer's heads
ENTROPY_BOUND = "spectral/entropy_bound"  #: Theorem 3.1's entropy lower bound of an attention layer
ALERTS = "alerts"  #: alerts a rule fired so far (target: the rule's name)
MEDIA = "media"  #: images (target: the figure's name)


def nc(stat: str) -> str:
    """The family of one neural-collapse statistic (``nc1``, ``nc2_equinorm``, ..., ``coincident_pairs``)."""
    return f"nc/{stat}"


def reparam(stat: str) -> str:
    """The family of one σReparam layer statistic (``gamma``, ``sigma``, ``ratio``)."""
    return f"spectral/reparam_{stat}"


def key(family: str, target: str) -> str:
    """The logged name of ``family`` measured on ``target``."""
    return f"{ROOT}{family}/{target}"


def heads_histogram(name: str) -> str:
    """The TensorBoard tag of the per-head histogram of value ``name``: under :data:`MEDIA`, never the scalar's own
    tag (TensorBoard's data server drops a tag that holds a scalar series and histograms both).

    Example:
        >>> heads_histogram("geomon/attention/entropy/blocks.0.attn")
        'geomon/media/heads/attention/entropy/blocks.0.attn'
    """
    return key(MEDIA, "heads/" + name.removeprefix(ROOT))


def prefix(family: str) -> str:
    """What every key of ``family`` starts with."""
    return f"{ROOT}{family}/"


def pattern(family: str) -> str:
    """An ``fnmatch`` pattern matching every key of ``family`` (alert rules, W&B summaries)."""
    return f"{ROOT}{family}/*"


def is_geomon(name: str) -> bool:
    """Whether ``name`` is one of geomon's keys."""
    return name.startswith(ROOT)


def split(name: str) -> tuple[str, str]:
    """``(family, target)`` of a geomon key."""
    if not is_geomon(name) or "/" not in name[len(ROOT) :]:
        raise ValueError(f"{name!r} is not a geomon key (geomon/<family>/<target>)")
    family, target = name[len(ROOT) :].rsplit("/", 1)
    return family, target
