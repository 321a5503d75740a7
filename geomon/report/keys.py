"""The ``geomon/...`` key prefixes the report knows how to draw, and its thresholds."""

ATTENTION = "geomon/attention/"
ENTROPY, NORMALIZED, MAX_LOGIT = ATTENTION + "entropy/", ATTENTION + "entropy_normalized/", ATTENTION + "max_logit/"
RANKME, RANKME_COV, ALPHA = "geomon/rankme/", "geomon/rankme_cov/", "geomon/alpha_req/"
NC, SIGMA, BOUND = "geomon/nc/", "geomon/spectral/sigma/", "geomon/spectral/entropy_bound/"
LOGIT_THRESHOLD = 100.0  # the max-logit scale QK-clip style monitors use (METRICS.md §3)
