"""Weights on an integer grid, and the closed-form corrections after rounding.

A linear layer ``y = x W + b`` (``W [F, O]``, :class:`graphopt.compress.lstsq.LinearLayer`'s view) is
stored with per-output-channel symmetric weights: ``W ≈ s · q`` with ``q`` integers in
``[−2^(k−1), 2^(k−1) − 1]`` (``k = 8`` or ``4``) and ``s_o = max_f |W_fo| / (2^(k−1) − 1)`` (zero
point 0, as onnxruntime's per-channel signed weights; the most negative code is never needed).

Three ways to choose ``q`` (and the float bias ``b``, which stays float in the QDQ model), each from the
statistics of :class:`~graphopt.compress.lstsq.CrossGram` gathered on the layer's *quantized* inputs
``X̃`` (what the layer sees in the quantized model, so it also absorbs the error of every layer before
it) and the float original's outputs ``Y`` at the same layer:

``rtn``     round to nearest, ``q = round(W / s)``; the bias is the original's.
``bias``    ``rtn`` codes, then the bias that minimises ``‖X̃ Ŵ + 1bᵀ − Y‖²``, i.e. the mean output
            error folded into the bias: ``b = (Σy − (Σx̃) Ŵ) / n`` (bias correction, Nagel et al.
            2019, here against the float outputs rather than only the weight error).
``weights`` the least-squares weights ``W* = argmin ‖X̃ W + 1bᵀ − Y‖² + λ‖W − W₀‖²`` (the ridge pulls
            towards the original weights ``W₀``), then rounded by GPTQ / OBQ (Frantar et al. 2022):
            the rows of ``[W*; b*]`` are rounded one input feature at a time, and the error of each
            rounding, ``δ = (w_f − s·q_f) / U_ff``, is moved onto the features not yet rounded,
            ``w_{f'} −= U_{f f'} δ``, with ``U`` the upper Cholesky factor of ``H⁻¹``,
            ``H = [X̃ 1]ᵀ[X̃ 1] + λI``. The bias row comes last and is never rounded, so it takes the
            remaining mean error in closed form. This is the closed-form counterpart of AdaRound /
            SeqMSE: it minimises the same layer output error ``‖[X̃ 1](θ* − θ̂)‖²`` greedily instead
            of by gradient descent.

``H`` is damped by ``damp · mean(diag H)`` (a feature the data never excites, e.g. a padded border
tap, would otherwise make ``H`` singular); the scale comes from ``W*`` (not ``W₀``), so no code
clips. A layer with fewer than one row per feature keeps ``rtn`` (its ``H`` would be noise): the
caller checks :func:`enough_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.compress.lstsq import CrossGram

METHODS = ("rtn", "bias", "weights")


def qmax(bits: int) -> int:
    """Largest code of a signed ``bits``-bit symmetric grid (127, 7)."""
    return 2 ** (bits - 1) - 1


def scales(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-output ``s_o = max_f |W_fo| / qmax`` of ``W [F, O]`` (a zero column gets scale 1: any code 0 is exact)."""
    top = np.abs(np.asarray(w, dtype=np.float64)).max(axis=0)
    return np.where(top > 0, top / qmax(bits), 1.0)


def round_nearest(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes ``clip(round(W / s), −qmax, qmax)`` (int64, ``[F, O]``)."""
    top = qmax(bits)
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) / scale), -top, top).astype(np.int64)


def gptq(theta: np.ndarray, h: np.ndarray, scale: np.ndarray, bits: int, rounded: int,
         damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Round the first ``rounded`` rows of ``theta [P, O]`` to ``s · q``, moving each row's error onto the
    later rows through ``H [P, P]`` (module docstring). Returns ``(codes [rounded, O], theta')``, where
    ``theta'`` holds the rounded rows as ``s · q`` and the unrounded ones (the bias) compensated."""
    theta = np.array(theta, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    p = h.shape[0]
    dead = np.diagonal(h) <= 0
    h[dead, dead] = 1.0  # a feature never seen: any value of its weight fits equally
    theta[:rounded][dead[:rounded]] = 0.0
    h[np.arange(p), np.arange(p)] += damp * float(np.diagonal(h).mean())
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        u = np.diag(1.0 / np.sqrt(np.diagonal(h)))  # no correlations known: plain rounding per feature
    top = qmax(bits)
    codes = np.zeros((rounded, theta.shape[1]), dtype=np.int64)
    for f in range(rounded):
        q = np.clip(np.rint(theta[f] / scale), -top, top)
        codes[f] = q.astype(np.int64)
        err = (theta[f] - q * scale) / u[f, f]
        theta[f] = q * scale
        theta[f + 1:] -= np.outer(u[f, f + 1:], err)
    return codes, theta


@dataclass
class Rounded:
    """One layer's integer weights: ``W ≈ codes · scale`` (``[F, O]``, per output), its float bias, and
    the layer's relative output error ``‖X̃ Ŵ + b − Y‖ / ‖Y − Ȳ‖`` on the statistics' rows, for the
    original weights rounded to nearest (``rtn_error``) and for the chosen codes (``error``)."""

    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None   # None: the layer has no bias
    method: str
    rtn_error: float
    error: float

    @property
    def weight(self) -> np.ndarray:
        return self.codes * self.scale


def enough_rows(gram: CrossGram, per_feature: float = 1.0) -> bool:
    return gram.count >= per_feature * (gram.features + 1)


def quantize_layer(gram: CrossGram, w0: np.ndarray, b0: np.ndarray, bits: int, method: str, *,
                   codes0: np.ndarray | None = None, scale0: np.ndarray | None = None,
                   ridge: float = 1e-3, damp: float = 0.01) -> Rounded:
    """The codes, scale and bias of one layer by ``method`` (``rtn`` / ``bias`` / ``weights``).

    ``gram`` holds ``X̃`` (quantized inputs) against ``Y`` (float outputs), with a bias column;
    ``w0 [F, O]`` and ``b0 [O]`` are the layer's float weights; ``codes0 [F, O]`` and ``scale0 [O]``, when
    given, are the round-to-nearest result to start from (onnxruntime's), else :func:`round_nearest`."""
    if method not in METHODS:
        raise ValueError(f"unknown rounding method {method!r}")
    w0 = np.asarray(w0, dtype=np.float64)
    b0 = np.asarray(b0, dtype=np.float64).reshape(-1)
    if codes0 is None or scale0 is None:
        scale0 = scales(w0, bits)
        codes = round_nearest(w0, scale0, bits)
    else:
        codes, scale0 = np.asarray(codes0, dtype=np.int64), np.asarray(scale0, dtype=np.float64)
    if not gram.bias:  # a layer without a bias slot (MatMul): the weights alone are fitted
        b0 = None
    rtn_error = gram.relative_error(codes * scale0, b0)
    if method == "rtn" or (method == "bias" and b0 is None):
        return Rounded(codes, scale0, b0, "rtn", rtn_error, rtn_error)
    if method == "bias":
        bias = _mean_fit_bias(gram, codes * scale0)
        return Rounded(codes, scale0, bias, method, rtn_error, gram.relative_error(codes * scale0, bias))
    f = w0.shape[0]
    h = gram.xtx.copy()
    lam = ridge * max(float(np.diagonal(h)[:f].mean()), 1e-12)
    h[np.arange(f), np.arange(f)] += lam
    r = gram.xty.copy()
    r[:f] += lam * w0  # ridge towards the original weights, not towards zero
    try:
        theta = np.linalg.solve(h, r)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(h, r, rcond=None)[0]
    scale = scales(theta[:f], bits)
    codes_w, fitted = gptq(theta, h, scale, bits, rounded=f, damp=damp)
    bias = fitted[f] if gram.bias else None
    error = gram.relative_error(codes_w * scale, bias)
    if error > rtn_error:  # the greedy order can lose on a layer with little data: never do worse than RTN
        bias = _mean_fit_bias(gram, codes * scale0) if gram.bias else None
        return Rounded(codes, scale0, bias, "bias" if gram.bias else "rtn", rtn_error,
                       gram.relative_error(codes * scale0, bias))
    return Rounded(codes_w, scale, bias, method, rtn_error, error)


def _mean_fit_bias(gram: CrossGram, w: np.ndarray) -> np.ndarray:
    """``b = (Σy − (Σx̃) W) / n``: the least-squares bias for fixed weights (the bias column's sums)."""
    f = w.shape[0]
    sum_x = gram.xtx[f, :f]
    sum_y = gram.xty[f]
    return (sum_y - sum_x @ w) / gram.count


__all__ = ["METHODS", "Rounded", "enough_rows", "gptq", "qmax", "quantize_layer", "round_nearest", "scales"]
