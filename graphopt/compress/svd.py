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

from graphopt.measure.blas import for_work


def whitener(cov: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``Σ + λI`` with ``λ = ridge · tr(Σ)/F`` (``L Lᵀ = Σ + λI``)."""
    return shifted_whitener(cov, ridge)[0]


def shifted_whitener(cov: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, float]:
    """``(L, λ')`` with ``L Lᵀ = sym(Σ) + λ'I``: ``λ' = ridge · tr(Σ)/F``, times 10 per retry while the
    Cholesky factorization fails (a covariance indefinite by rounding)."""
    f = cov.shape[0]
    cov = (cov + cov.T) / 2  # a streamed XᵀX/n − μμᵀ can be asymmetric by rounding
    lam = ridge * max(float(np.trace(cov)) / f, 1e-12)
    jitter = lam
    for _ in range(8):  # a numerically indefinite covariance (rounding) needs a little more ridge
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(f)), jitter
        except np.linalg.LinAlgError:
            jitter *= 10
    raise np.linalg.LinAlgError("covariance is not positive definite even with ridge")


@dataclass
class Factorization:
    """The SVD of ``W`` (plain) or of ``LᵀW`` (whitened), kept as what every truncation reads: ``L⁻ᵀU``
    (``U`` itself when plain), the singular values and ``Vᵀ``. Truncate it at any rank with :meth:`factors`.
    ``W``, ``U`` and ``L`` are not kept: on a BERT-base encoder they were three quarters of the pass's memory."""

    left: np.ndarray       # [F, k]: L⁻ᵀU (whitened) or U (plain)
    s: np.ndarray          # [k]
    vt: np.ndarray         # [k, O]
    whitened: bool = False
    shift: float = 0.0     # L Lᵀ = Σ + shift·I (the ridge the whitener added)

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
        """``(P [F, r], Q [r, O])`` with ``P·Q`` the best rank-``r`` approximation in this metric:
        ``P = L⁻ᵀ U_r S_r^½``, ``Q = S_r^½ V_rᵀ``."""
        root = np.sqrt(self.s[:rank])
        return self.left[:, :rank] * root, root[:, None] * self.vt[:rank]

    def whitened_errors(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per component ``i`` of a whitened factorization, the terms of the error of a truncation, read
        off the SVD instead of forming ``ΔW`` at every rank.

        With ``M = LᵀW = U S Vᵀ`` the rank-``r`` error is ``ΔW = L⁻ᵀ U_t S_t V_tᵀ`` over the discarded
        components ``t = r..k``, so with ``L Lᵀ = Σ + shift·I``::

            tr(ΔWᵀ Σ ΔW) = Σ_t s_t² (1 − shift·‖L⁻ᵀu_t‖²)        ΔWᵀμ = Σ_t v_t s_t (u_tᵀ L⁻¹ μ)

        Returns ``(s_t²(1 − shift·‖L⁻ᵀu_t‖²), s_t·u_tᵀL⁻¹μ)`` for every component; the sums of their tails
        (the second through ``vt``) give a rank's output error and mean error. Exact for the covariance
        the whitener was built from."""
        if not self.whitened:
            raise ValueError("not a whitened factorization")
        left = self.left
        energy = self.s ** 2 * (1.0 - self.shift * np.einsum("ij,ij->j", left, left))
        return energy, self.s * (left.T @ np.asarray(mean, dtype=np.float64))


def factorize(w: np.ndarray, cov: np.ndarray | None = None, ridge: float = 1e-6) -> Factorization:
    """SVD of ``W [F, O]``; whitened by ``cov [F, F]`` (the input covariance) when given."""
    w = np.asarray(w, dtype=np.float64)
    if cov is None:
        u, s, vt = thin_svd(w)
        return Factorization(u, s, vt)
    l, shift = shifted_whitener(np.asarray(cov, dtype=np.float64), ridge)
    u, s, vt = thin_svd(l.T @ w)
    f, o = w.shape
    if f >= o:
        # U = LᵀW·V·S⁻¹ (thin_svd's tall side), so L⁻ᵀU = W·V·S⁻¹: no solve with the F×F whitener (a dense
        # LU of 3072² per layer was most of a BERT-base factorization).
        live = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros(s.shape, bool)
        left = (w @ vt.T) * np.where(live, 1.0 / np.where(live, s, 1.0), 0.0)
    else:
        with for_work(2.0 * f ** 3):
            left = np.linalg.solve(l.T, u)   # L⁻ᵀU: what every rank's P scales (F < O: a small solve)
    return Factorization(left, s, vt, True, shift)


def thin_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, s, Vᵀ`` of ``M [F, O]`` (``k = min(F, O)`` components, ``s`` descending) from the eigenvectors
    of the smaller Gram matrix (``MᵀM`` or ``MMᵀ``): 4-6 times faster than LAPACK's SVD for a
    3072×768 layer. The squared singular values carry an absolute error of about ``ε·s₁²``, far below any
    tail a rank choice reads; a component with ``s ≈ 0`` gets zero singular vectors on the side computed
    from the other. Every truncation stays the exact projection of ``M`` on the kept components
    (``U_r S_r V_rᵀ = M V_r V_rᵀ``, or ``U_r U_rᵀ M``), whatever the orthogonality of the computed side."""
    f, o = m.shape
    tall = f >= o
    k = min(f, o)
    with for_work(2.0 * f * o * k):
        gram = m.T @ m if tall else m @ m.T
    # The eigensolver on the caller's threads (one, in the lossy passes): OpenBLAS's threaded LAPACK ran a
    # 768² eigh 7 times slower on 2 cores than on one while another process shared them.
    vals, vecs = np.linalg.eigh(gram)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    s = np.sqrt(np.maximum(vals, 0.0))
    live = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros(s.shape, bool)
    inv = np.where(live, 1.0 / np.where(live, s, 1.0), 0.0)
    with for_work(2.0 * f * o * k):
        if tall:
            return (m @ vecs) * inv, s, vecs.T
        return vecs, s, (vecs.T @ m) * inv[:, None]


def output_error(dw: np.ndarray, cov: np.ndarray) -> float:
    """``tr(ΔWᵀ Σ ΔW)``: the squared output error (summed over outputs) of a weight change ``ΔW [F, O]``."""
    return float(np.sum(dw * (cov @ dw)))


def conv_out_size(size: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


def column_average(cov: np.ndarray, channels: int, kh: int, kw: int) -> np.ndarray:
    """``Σ_v[(c,i),(c',i')] = mean_j Σ[(c,i,j),(c',i',j)]``: covariance of vertical ``kh×1`` patches."""
    c6 = cov.reshape(channels, kh, kw, channels, kh, kw)
    return np.einsum("aibcjb->aicj", c6).reshape(channels * kh, channels * kh) / kw
