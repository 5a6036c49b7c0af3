"""Truncated SVD of a layer's weight matrix, plain or whitened by the layer's input statistics.

A linear layer computes ``y = Wᵀx + b`` with ``W`` of shape ``[F, O]`` (``F`` input features, ``O``
outputs). A rank-``r`` factorization ``W ≈ P·Q`` (``P [F, r]``, ``Q [r, O]``) is two layers of
``r·(F + O)`` weights instead of ``F·O``.

Plain SVD minimises the weight error ``‖W − P Q‖_F``. The data-aware variant minimises the *output*
error on calibration inputs. With the input mean ``μ`` and covariance ``Σ = L Lᵀ`` (Cholesky, plus a
small ridge so that dead inputs do not make it singular)::

    E‖(W − W')ᵀx − δ‖²  with  δ = (W − W')ᵀμ   =   tr((W − W')ᵀ Σ (W − W'))  =  ‖Lᵀ(W − W')‖²_F

so the best rank-``r`` ``W'`` is ``L⁻ᵀ·[LᵀW]_r`` (Eckart–Young on the whitened matrix ``LᵀW``; this is
SVD-LLM's truncation-aware whitening), and the bias absorbs the mean error: ``b' = b + (W − W')ᵀμ``.
The discarded squared singular values of ``LᵀW`` are exactly the remaining output error (centered),
so rank choices by energy or error budget read it off the spectrum.

The factors are split symmetrically, ``P = L⁻ᵀ U_r S_r^½`` and ``Q = S_r^½ V_rᵀ``, so both layers have
weights of similar magnitude (float32 friendly).

Helpers for convolutions (the patch rows themselves come from :meth:`graphopt.compress.lstsq.LinearLayer.rows`, in the
``(c, i, j)`` order of ``W[o, c, i, j]``): :func:`column_average` (the covariance of *vertical* patches ``(c, i)`` averaged over
the kernel columns, for the spatial ``k×1 → 1×k`` scheme). Streaming input moments come from
:class:`graphopt.measure.calibration.Gram`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def whitener(cov: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``Σ + λI`` with ``λ = ridge · tr(Σ)/F`` (``L Lᵀ = Σ + λI``)."""
    f = cov.shape[0]
    cov = (cov + cov.T) / 2  # a streamed XᵀX/n − μμᵀ can be asymmetric by rounding
    lam = ridge * max(float(np.trace(cov)) / f, 1e-12)
    jitter = lam
    for _ in range(8):  # a numerically indefinite covariance (rounding) needs a little more ridge
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(f))
        except np.linalg.LinAlgError:
            jitter *= 10
    raise np.linalg.LinAlgError("covariance is not positive definite even with ridge")


@dataclass
class Factorization:
    """The SVD of ``W`` (plain) or of ``LᵀW`` (whitened); truncate it at any rank with :meth:`factors`."""

    w: np.ndarray          # [F, O], float64
    u: np.ndarray          # [F, k]
    s: np.ndarray          # [k]
    vt: np.ndarray         # [k, O]
    l: np.ndarray | None   # whitener (lower triangular) or None

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def total(self) -> float:
        """``Σ s²``: ``‖W‖²_F`` (plain) or the output variance ``tr(WᵀΣW)`` (whitened)."""
        return float(np.sum(self.s ** 2))

    def tail(self, rank: int) -> float:
        """Squared error left at ``rank``: ``Σ_{i ≥ r} s_i²``."""
        return float(np.sum(self.s[rank:] ** 2))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P [F, r], Q [r, O])`` with ``P·Q`` the best rank-``r`` approximation in this metric."""
        root = np.sqrt(self.s[:rank])
        p = self.u[:, :rank] * root
        if self.l is not None:
            p = np.linalg.solve(self.l.T, p)  # L⁻ᵀ U_r S_r^½ (triangular, solved as dense: small matrices)
        return p, root[:, None] * self.vt[:rank]


def factorize(w: np.ndarray, cov: np.ndarray | None = None, ridge: float = 1e-6) -> Factorization:
    """SVD of ``W [F, O]``; whitened by ``cov [F, F]`` (the input covariance) when given."""
    w = np.asarray(w, dtype=np.float64)
    l = None
    target = w
    if cov is not None:
        l = whitener(np.asarray(cov, dtype=np.float64), ridge)
        target = l.T @ w
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    return Factorization(w, u, s, vt, l)


def output_error(dw: np.ndarray, cov: np.ndarray) -> float:
    """``tr(ΔWᵀ Σ ΔW)``: the squared output error (summed over outputs) of a weight change ``ΔW [F, O]``."""
    return float(np.sum(dw * (cov @ dw)))


def conv_out_size(size: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


def column_average(cov: np.ndarray, channels: int, kh: int, kw: int) -> np.ndarray:
    """``Σ_v[(c,i),(c',i')] = mean_j Σ[(c,i,j),(c',i',j)]``: covariance of vertical ``kh×1`` patches."""
    c6 = cov.reshape(channels, kh, kw, channels, kh, kw)
    return np.einsum("aibcjb->aicj", c6).reshape(channels * kh, channels * kh) / kw
