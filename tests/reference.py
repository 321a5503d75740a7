"""Independent float64 numpy references for the geomon tests, written from METRICS.md alone."""

import numpy as np


def _exp_entropy(p: np.ndarray) -> float:
    """exp(-sum p log p) of an already eps-shifted distribution."""
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_rankme(z: np.ndarray, eps: float = 1e-7, centered: bool = False) -> float:
    """RankMe (METRICS.md section 1) over the min(N, D) values the SVD gives: the singular values of the uncentred
    z, or the squared singular values of the centred z (the covariance eigenvalues PCA keeps, up to a scale)."""
    z = np.asarray(z, dtype=np.float64)
    if centered:
        values = np.linalg.svd(z - z.mean(axis=0), compute_uv=False) ** 2
    else:
        values = np.linalg.svd(z, compute_uv=False)
    p = values / values.sum() + eps
    return _exp_entropy(p)


def ref_alpha_fit(eigenvalues_descending: np.ndarray, fit_range: tuple[int, int] = (11, 100)) -> tuple[float, float]:
    """Weighted (w = 1/i) least squares of log lambda_i = -alpha log i + c; returns (alpha, weighted R^2)."""
    lam = np.asarray(eigenvalues_descending, dtype=np.float64)
    lo, hi = fit_range
    if lam.shape[0] < hi or np.any(lam[lo - 1 : hi] <= 0):
        return float("nan"), float("nan")
    i = np.arange(lo, hi + 1, dtype=np.float64)
    y = np.log(lam[lo - 1 : hi])
    w = 1.0 / i
    x = np.stack([np.log(i), np.ones_like(i)], axis=1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    yhat = x @ coef
    ybar = np.sum(w * y) / np.sum(w)
    ss_res = np.sum(w * (y - yhat) ** 2)
    ss_tot = np.sum(w * (y - ybar) ** 2)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return float(-coef[0]), float(r2)


def ref_alpha_req(z: np.ndarray, fit_range: tuple[int, int] = (11, 100)) -> tuple[float, float]:
    """alpha-ReQ (section 2) on the centred covariance eigenvalues of z; NaN if too few non-zero ones."""
    z = np.asarray(z, dtype=np.float64)
    lam = np.sort(np.linalg.eigvalsh(np.atleast_2d(np.cov(z, rowvar=False))))[::-1]
    # Numerically zero eigenvalues (rank deficiency) count as zero, with matrix_rank's tolerance.
    tol = max(lam[0], 0.0) * max(z.shape) * np.finfo(np.float64).eps
    lam = np.where(lam > tol, lam, 0.0)
    return ref_alpha_fit(lam, fit_range)


def ref_attention_entropy(
    q: np.ndarray,
    k: np.ndarray,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query attention entropy, max logit and allowed-key count (section 3), from full scores."""
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal cannot be combined with attn_mask")
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    b, h, nq, dh = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if h % hk != 0:
        raise ValueError("number of key heads must divide number of query heads")
    k = np.repeat(k, h // hk, axis=1)  # query head j reads key head j // (h // hk)
    if scale is None:
        scale = 1.0 / np.sqrt(dh)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    allowed = np.ones((b, h, nq, nk), dtype=bool)
    if is_causal:
        allowed &= np.tril(np.ones((nq, nk), dtype=bool), 0)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            allowed &= np.broadcast_to(mask, allowed.shape)
        else:
            blocked = np.isneginf(mask) | (mask == np.finfo(mask.dtype).min)
            allowed &= ~np.broadcast_to(blocked, allowed.shape)
            s = s + np.broadcast_to(mask.astype(np.float64), s.shape)
    entropy = np.full((b, h, nq), np.nan)
    max_logit = np.full((b, h, nq), np.nan)
    n_keys = allowed.sum(axis=-1).astype(np.int64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                row = s[bi, hi, i][allowed[bi, hi, i]]
                if row.size == 0:
                    continue
                m = row.max()
                e = np.exp(row - m)
                p = e / e.sum()
                pos = p[p > 0]
                entropy[bi, hi, i] = -np.sum(pos * np.log(pos))
                max_logit[bi, hi, i] = m
    return entropy, max_logit, n_keys


def ref_normalized_entropy(entropy: np.ndarray, n_keys: np.ndarray) -> np.ndarray:
    """entropy / log(n_keys), NaN where n_keys <= 1."""
    entropy = np.asarray(entropy, dtype=np.float64)
    n = np.asarray(n_keys, dtype=np.float64)
    out = np.full(np.broadcast(entropy, n).shape, np.nan)
    ok = np.broadcast_to(n > 1, out.shape)
    out[ok] = (np.broadcast_to(entropy, out.shape)[ok]) / np.log(np.broadcast_to(n, out.shape)[ok])
    return out


def ref_entropy_lower_bound(sigma: float, n_keys: int) -> float:
    """Zhai et al. Theorem 3.1 lower bound on attention entropy (section 4); 0 for a single key."""
    t = float(n_keys)
    if n_keys == 1:
        return 0.0
    sigma = float(sigma)
    beta = np.exp(-sigma * np.sqrt(t / (t - 1.0)))
    denom = 1.0 + (t - 1.0) * beta
    return float(np.log(denom) + sigma * np.sqrt(t * (t - 1.0)) * beta / denom)


def ref_simplex_etf(C: int, D: int, rng: np.random.Generator) -> np.ndarray:  # noqa: N803, RUF100
    """C x D means of an exact simplex ETF (centred, unit norm, cos = -1/(C-1)), randomly rotated."""
    if D < C:
        raise ValueError("need D >= C")
    etf = np.sqrt(C / (C - 1.0)) * (np.eye(C) - np.ones((C, C)) / C)  # rows: the ETF in R^C
    basis, _ = np.linalg.qr(rng.standard_normal((D, C)))  # D x C, orthonormal columns
    return etf @ basis.T


def ref_neural_collapse(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    num_classes: int | None = None,
    class_means: np.ndarray | None = None,
    cdnv_exponent: float = 2.0,
) -> dict[str, float]:
    """Neural-collapse statistics (section 6) by explicit per-class and per-pair loops, seen classes only."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    n, d = h.shape
    if num_classes is None:
        num_classes = int(np.asarray(weight).shape[0]) if weight is not None else int(y.max()) + 1
    seen = [c for c in range(num_classes) if np.any(y == c)]
    cs = len(seen)
    mu = {c: h[y == c].mean(axis=0) for c in seen}
    mu_g = np.mean([mu[c] for c in seen], axis=0)
    m = np.stack([mu[c] - mu_g for c in seen], axis=1)  # D x C_seen

    sigma_w = np.zeros((d, d))
    for i in range(n):
        r = h[i] - mu[int(y[i])]
        sigma_w += np.outer(r, r)
    sigma_w /= n
    sigma_b = m @ m.T / cs
    out: dict[str, float] = {"nc1": float(np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / cs)}

    norms = np.array([np.linalg.norm(m[:, j]) for j in range(cs)])
    out["nc2_equinorm"] = float(np.std(norms, ddof=1) / np.mean(norms))
    # a mean at mu_G to rounding (|mu_c - mu_G|^2 <= 1e-12 (|mu_c|^2 + mean_c' |mu_c'|^2)) has no direction: NaN cosines
    mean_sq = np.mean([mu[c] @ mu[c] for c in seen])
    direction = [norms[j] ** 2 > 1e-12 * (mu[seen[j]] @ mu[seen[j]] + mean_sq) for j in range(cs)]
    pair_cos = []  # all ordered pairs c != c'
    for a in range(cs):
        for b in range(cs):
            if a != b:
                apart = direction[a] and direction[b]
                pair_cos.append(m[:, a] @ m[:, b] / (norms[a] * norms[b]) if apart else np.nan)
    cos_off = np.array(pair_cos)
    out["nc2_equiangular"] = float(np.std(cos_off, ddof=1))
    out["nc2_maxangle"] = float(np.mean(np.abs(cos_off + 1.0 / (cs - 1))))

    var = {c: np.mean(np.sum((h[y == c] - mu[c]) ** 2, axis=1)) for c in seen}
    with np.errstate(invalid="ignore", divide="ignore"):  # a mean exactly at mu_G: NaN, never used
        muhat = m / norms[None, :]
    cdnv, logs, coincident = [], [], 0
    for a in range(cs):
        for b in range(a + 1, cs):
            ca, cb = seen[a], seen[b]
            dist = np.linalg.norm(mu[ca] - mu[cb])
            # pairs whose means coincide to float64 rounding have an infinite CDNV: left out and counted (the scale
            # of a class: |mu_c|^2 + |mu_c - mu_G|^2)
            scale_a = mu[ca] @ mu[ca] + norms[a] ** 2
            scale_b = mu[cb] @ mu[cb] + norms[b] ** 2
            if dist**2 > 1e-12 * (scale_a + scale_b):
                cdnv.append((var[ca] + var[cb]) / (2.0 * dist**cdnv_exponent))
            else:
                coincident += 1
            unit_dist = np.linalg.norm(muhat[:, a] - muhat[:, b])
            if direction[a] and direction[b] and unit_dist**2 > 2e-12:
                logs.append(np.log(1.0 / unit_dist))
    out["cdnv"] = float(np.mean(cdnv)) if cdnv else float("nan")
    out["gnc2_mean"] = float(np.mean(logs)) if logs else float("nan")
    out["gnc2_var"] = float(np.var(logs, ddof=1)) if len(logs) > 1 else float("nan")
    out["coincident_pairs"] = coincident / (cs * (cs - 1) / 2)

    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        ws = w[seen]  # C_seen x D
        out["nc3"] = float(np.linalg.norm(ws.T / np.linalg.norm(ws) - m / np.linalg.norm(m)) ** 2)
        cosw = np.array(
            [ws[j] @ m[:, j] / (np.linalg.norm(ws[j]) * norms[j]) if direction[j] else np.nan for j in range(cs)]
        )
        out["nc3_cos_mean"] = float(np.mean(cosw))
        out["unc3"] = float(np.std(cosw, ddof=1) / np.mean(cosw))
        b_vec = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
        if class_means is None:
            centres = {c: mu[c] for c in seen}
        else:
            cm = np.asarray(class_means, dtype=np.float64)
            centres = {c: cm[c] for c in range(cm.shape[0]) if not np.any(np.isnan(cm[c]))}
        centre_ids = list(centres)
        wrong = 0
        for i in range(n):
            decision = int(np.argmax(w @ h[i] + b_vec))
            dists = [np.linalg.norm(h[i] - centres[c]) for c in centre_ids]
            nearest = centre_ids[int(np.argmin(dists))]
            wrong += decision != nearest
        out["nc4"] = wrong / n
    return out
