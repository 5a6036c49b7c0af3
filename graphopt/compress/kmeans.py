"""Scalar k-means for weight sharing (Deep Compression, Han et al. 2016) and the least-squares centroid re-fit.

k-means
-------
The weights ``w_i`` of one layer (pruned zeros excluded) are clustered into ``k`` centroids ``c_j``
minimising ``Σ_i a_i (w_i − c_{l(i)})²``, with importance ``a_i = 1`` (plain) or the calibration input
energy of the weight's input feature (``diag(XᵀX)``; the *activation-weighted* variant: a weight that
multiplies large inputs moves the output more). Lloyd's iterations: each weight goes to the nearest
centroid (the importance does not change which one is nearest for a scalar), each centroid becomes the
importance-weighted mean of its weights. Initialisation (Han et al. compare the three and found linear
best, because it keeps the few large weights that matter):

* ``linear``: ``k`` points evenly spaced in ``[min w, max w]``;
* ``density``: the ``(j + ½)/k`` quantiles of the weights (evenly spaced in their CDF);
* ``kmeans++``: Arthur & Vassilvitskii's ``D²`` seeding (importance-weighted, seeded generator).

A centroid that loses all its weights keeps its value; duplicates are harmless (Lloyd's step never
assigns to both) and the codebook keeps ``k`` entries.

Centroid re-fit
---------------
With the assignments fixed, the layer output ``y_o = Σ_f x_f W_fo + b_o`` is linear in the centroids:
``W_fo = c_{l(f, o)}``. With ``H_λ`` and ``R`` of :func:`graphopt.passes.lossy.sparsify.penalised` (``XᵀX`` plus a
ridge pulling towards the unshared weights, bias last) the loss ``Σ_o w_oᵀH_λw_o − 2R_oᵀw_o`` is a
quadratic in ``θ = [c_1..c_k, b_1..b_O]``: with ``P_o`` the ``[F, k]`` one-hot assignment of output ``o``,

    A_cc = Σ_o P_oᵀ H P_o,   A_cb[:, o] = P_oᵀ H_{F,bias},   A_bb = H_{bias,bias}·I,
    r_c = Σ_o P_oᵀ R_{F,o},   r_b[o] = R_{bias,o},

solved in one ``(k + O)``-sized system. Pruned weights are in no cluster and stay exactly zero.
"""

from __future__ import annotations

import numpy as np

INITS = ("linear", "density", "kmeans++")


def init_centroids(values: np.ndarray, k: int, method: str, importance: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """``k`` starting centroids for ``values`` (1-D) by ``method`` (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to cluster")
    if method == "linear":
        return np.linspace(values.min(), values.max(), k)
    if method == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    if method == "kmeans++":
        rng = rng or np.random.default_rng(0)
        a = np.ones_like(values) if importance is None else np.asarray(importance, dtype=np.float64).ravel()
        a = np.maximum(a, 0) + 1e-30
        centers = [values[rng.choice(values.size, p=a / a.sum())]]
        d2 = (values - centers[0]) ** 2
        for _ in range(1, k):
            p = a * d2
            if p.sum() <= 0:
                centers.append(centers[-1])
                continue
            centers.append(values[rng.choice(values.size, p=p / p.sum())])
            d2 = np.minimum(d2, (values - centers[-1]) ** 2)
        return np.sort(np.asarray(centers))
    raise ValueError(f"unknown init {method!r} (known: {', '.join(INITS)})")


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each value (ties to the lower centroid)."""
    order = np.argsort(centroids, kind="stable")
    sorted_c = centroids[order]
    mid = (sorted_c[1:] + sorted_c[:-1]) / 2
    return order[np.searchsorted(mid, values, side="left")]


def kmeans(values: np.ndarray, k: int, *, init: str = "linear", importance: np.ndarray | None = None,
           iters: int = 100, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Importance-weighted scalar k-means; returns ``(centroids [k], labels)``.

    Stops when no assignment changes or after ``iters`` Lloyd iterations.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    a = np.ones_like(values) if importance is None else np.asarray(importance, dtype=np.float64).ravel()
    centroids = init_centroids(values, k, init, a, rng).astype(np.float64)
    labels = assign(values, centroids)
    for _ in range(iters):
        num = np.bincount(labels, weights=a * values, minlength=k)
        den = np.bincount(labels, weights=a, minlength=k)
        filled = den > 0
        centroids = np.where(filled, num / np.where(filled, den, 1), centroids)
        new = assign(values, centroids)
        if np.array_equal(new, labels):
            break
        labels = new
    return centroids, labels


def refit_centroids(h: np.ndarray, r: np.ndarray, labels: np.ndarray, k: int,
                    ridge: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares centroids and biases for fixed assignments (module docstring).

    Parameters
    ----------
    h : ``[F+1, F+1]`` penalised ``XᵀX`` (bias last).
    r : ``[F+1, O]`` right-hand side.
    labels : ``[F, O]`` cluster of each weight, ``-1`` for a pruned (zero) weight.
    k : number of centroids.
    ridge : tiny diagonal (relative) so a centroid no weight uses stays determined (it gets 0; callers
        keep their own value for it).

    Returns
    -------
    (centroids [k], bias [O])
    """
    f1, o = r.shape
    f = f1 - 1
    a_cc = np.zeros((k, k))
    a_cb = np.zeros((k, o))
    r_c = np.zeros(k)
    for j in range(o):
        lab = labels[:, j]
        idx = np.flatnonzero(lab >= 0)
        if idx.size == 0:
            continue
        order = np.argsort(lab[idx], kind="stable")
        idx, lab_sorted = idx[order], lab[idx][order]
        present, starts = np.unique(lab_sorted, return_index=True)
        block = h[np.ix_(idx, idx)]
        agg = np.add.reduceat(np.add.reduceat(block, starts, axis=0), starts, axis=1)
        a_cc[np.ix_(present, present)] += agg
        a_cb[present, j] += np.add.reduceat(h[idx, f], starts)
        r_c[present] += np.add.reduceat(r[idx, j], starts)
    a = np.zeros((k + o, k + o))
    a[:k, :k] = a_cc
    a[:k, k:] = a_cb
    a[k:, :k] = a_cb.T
    a[k:, k:] = h[f, f] * np.eye(o)
    rhs = np.concatenate([r_c, r[f]])
    scale = max(float(np.abs(np.diagonal(a)).mean()), 1e-30)
    a[np.arange(k + o), np.arange(k + o)] += ridge * scale
    sol = np.linalg.solve(a, rhs)
    return sol[:k], sol[k:]
