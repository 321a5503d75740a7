"""The key prefixes the report draws, spelled by :mod:`geomon.keys`, and its thresholds."""

from geomon import keys

ENTROPY, NORMALIZED = keys.prefix(keys.ENTROPY), keys.prefix(keys.ENTROPY_NORMALIZED)
MAX_LOGIT = keys.prefix(keys.MAX_LOGIT)
RANKME, ALPHA = keys.prefix(keys.RANKME), keys.prefix(keys.ALPHA_REQ)
RANKME_COV = keys.prefix(keys.RANKME_COV)  #: the covariance RankMe, the curve the phases are read from
NC = keys.ROOT + keys.nc("")  #: every neural-collapse statistic: ``NC + "<stat>/<probe>"``
SIGMA, BOUND = keys.prefix(keys.SIGMA), keys.prefix(keys.ENTROPY_BOUND)
ALERTS = keys.prefix(keys.ALERTS)
LOGIT_THRESHOLD = 100.0  # the max-logit scale QK-clip style monitors use (METRICS.md §3)
