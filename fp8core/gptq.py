"""GPTQ rounding of an FP8 weight (``--weight_rounding gptq``).

For a layer ``y = x @ W`` with ``W`` as ``[K, N]`` (K input features) and the inputs' second
moment ``H = sum x x^T`` (``[K, K]``), the output error of a rounded weight ``Q`` summed over the
calibration rows is ``tr((W - Q)^T H (W - Q))``. GPTQ (Frantar et al., 2023) rounds one input
feature (one row of W) at a time to the FP8 grid and spreads its rounding error over the rows
not rounded yet, weighted by the inverse Hessian:

* ``H += damp * mean(diag H) * I`` (``damp`` = 0.01); a feature that is always zero gets
  ``H[k, k] = 1`` and its row of W is set to 0 (it never reaches the output);
* ``U`` = the upper Cholesky factor of ``H^-1``;
* for k = 0..K-1: ``q_k = grid(w_k)``, ``e = (w_k - q_k) / U[k, k]``, ``w_j -= U[k, j] e`` for j > k
  (applied in blocks of :data:`BLOCK` rows, the lazy batch update of the paper: same result).

``grid`` is round to nearest FP8 (ties to even, saturating) at the weight's scale(s): a power of
two, one real scale, or one real scale per output channel (per column of ``W`` as ``[K, N]``).
The result is ``Q`` in float32, every value exactly ``fp8 * scale``, so encoding it again to
nearest gives back the same FP8 values.
"""

from __future__ import annotations

import numpy as np

from fp8core.formats import get_format, round_trip_into
from fp8core.scale import Scale

DAMP = 0.01
BLOCK = 128
MIN_ROWS_PER_FEATURE = 4  # a least-squares refit of the weight itself (fp8core.activation_fit) needs more


def rows_determine(rows: int, features: int) -> bool:
    """Whether ``rows`` calibration rows of ``features`` inputs determine a fit to them: with fewer
    rows than inputs ``H`` is singular, the rows do not span the inputs and a fit follows their
    noise. gptaq (:mod:`fp8core.activation_fit`) keeps such an op's bias instead of shifting it
    by the mean output error of so few rows; its weight, like GPTQ's (:mod:`fp8core.weight_adjust`),
    is still rounded by GPTQ with the damped Hessian. PP-OCRv4 rec's squeeze-excitation convs (one
    pooled row per sample, 32 rows for K = 60-480) emptied 23 of 120 recognised lines with their
    biases shifted, and gave the best CER (0.028) with only their weights fitted; left at round to
    nearest under ``--weight_rounding gptq`` they cost PP-OCRv4 rec 0.650 -> 0.508 string agreement
    and silero VAD v6 0.995 -> 0.982 (real-model suite)."""
    return rows >= features


def fp8_grid(fmt: str, scale: Scale | np.ndarray | float) -> callable:
    """Round rows of ``[., N]`` to nearest FP8 at ``scale``: a :class:`~fp8core.scale.Scale` (a
    power of two or real scalar), or real multipliers (a scalar, or one per column as numpy
    broadcasts them). Bit for bit :func:`fp8core.formats.round_trip` (a NaN stays NaN), by
    arithmetic: GPTQ calls it once per input feature on one row (ResNet50: 41k calls, 1.7 s
    through the table)."""
    f = get_format(fmt)
    if isinstance(scale, Scale) and scale.axis is not None:
        raise ValueError("fp8_grid takes a scale along an axis as multipliers that broadcast against the rows")
    m = scale.multiplier(()) if isinstance(scale, Scale) else np.asarray(scale, np.float32)

    def grid(rows: np.ndarray) -> np.ndarray:
        x32 = np.asarray(rows, np.float32)
        return round_trip_into(x32, m, f, np.empty(np.broadcast_shapes(x32.shape, np.shape(m)), np.float32),
                               signed_zero=True)

    return grid


def gptq_round(w_kn: np.ndarray, h: np.ndarray, grid, damp: float = DAMP, block: int = BLOCK) -> np.ndarray:
    """``Q`` (float32, ``[K, N]``) for ``W`` = ``w_kn`` and ``H`` = ``h`` (module docstring)."""
    w_kn = np.asarray(w_kn)
    h = np.asarray(h)
    if h.shape != (w_kn.shape[0],) * 2:
        raise ValueError(f"H is {list(h.shape)} but the weight has {w_kn.shape[0]} input features")
    return gptq_round_groups(w_kn[None], h[None], grid, damp, block)[0]


def gptq_round_groups(w_gkn: np.ndarray, h: np.ndarray, grid, damp: float = DAMP, block: int = BLOCK) -> np.ndarray:
    """GPTQ on G independent groups at once (grouped and depthwise Conv): ``w_gkn`` is
    ``[G, K, N]``, ``h`` is ``[G, K, K]``, ``grid`` rounds ``[G, rows, N]`` arrays. Each group is
    exactly :func:`gptq_round` of its own weight and Hessian; the loops run over K, not over G."""
    w = np.array(w_gkn, np.float64)
    g, k, _ = w.shape
    if h.shape != (g, k, k):
        raise ValueError(f"H is {list(h.shape)} but the weight has {g} groups of {k} input features")
    h = np.array(h, np.float64)
    diag = np.einsum("gkk->gk", h)  # a writable view
    dead = diag <= 0
    diag[dead] = 1.0
    w[dead, :] = 0.0
    diag += damp * diag.mean(axis=1, keepdims=True)
    u = inverse_cholesky_upper(h)
    del h, diag  # K x K float64: not needed past U
    q = np.zeros_like(w, dtype=np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            qi = grid(w1[:, i:i + 1])[:, 0]
            q[:, i1 + i] = qi
            e = (w1[:, i] - qi) / u1[:, i, i, None]
            w1[:, i + 1:] -= u1[:, i, i + 1:, None] * e[:, None, :]
            err[:, i] = e
        w[:, i2:] -= u[:, i1:i2, i2:].transpose(0, 2, 1) @ err
    return q


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """``U``, upper triangular with a positive diagonal, such that ``H^-1 = U^T U`` (``h``:
    ``[G, K, K]`` positive definite), without inverting ``H``: with ``P`` the reversal of the K
    indices and ``P H P = L L^T`` (Cholesky), ``H = R R^T`` for the upper ``R = P L P``, so
    ``H^-1 = R^-T R^-1`` and ``U = R^-1 = P L^-1 P``. A Cholesky and a triangular inverse cost
    about K^3 / 6 multiply-adds each, ``inv`` then a Cholesky of the inverse about 7 K^3 / 6
    (K = 2304: 0.30 s against 0.77 s)."""
    lower = np.linalg.cholesky(h[:, ::-1, ::-1])
    return _lower_inverse(lower)[:, ::-1, ::-1]


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of lower triangular ``[G, K, K]`` matrices, by halves:
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``."""
    k = lower.shape[-1]
    if k <= 128:
        return np.tril(np.linalg.inv(lower))
    m = k // 2
    a_inv, c_inv = _lower_inverse(lower[:, :m, :m]), _lower_inverse(lower[:, m:, m:])
    out = np.zeros_like(lower)
    out[:, :m, :m] = a_inv
    out[:, m:, m:] = c_inv
    out[:, m:, :m] = -c_inv @ (lower[:, m:, :m] @ a_inv)
    return out


def output_error(w_kn: np.ndarray, q_kn: np.ndarray, h: np.ndarray) -> float:
    """``tr((W - Q)^T H (W - Q))``: the summed squared output error over the rows behind ``H``."""
    d = np.asarray(w_kn, np.float64) - np.asarray(q_kn, np.float64)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))
