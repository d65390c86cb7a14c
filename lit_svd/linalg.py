"""Pure tensor maths behind every adapter: top-r SVD, thin QR, residuals and spectral metrics.

Tensors in, tensors out: nothing here knows about ``nn.Module`` or Lightning, so each function can be
tested alone against a float64 reference. Every function accepts a leading batch dimension so that all
same-shape weights of a model are decomposed in one call.

Notation (SPEC §2): a weight ``W`` has shape ``(m, n) = (out_features, in_features)``; its thin SVD is
``W = U diag(S) V^T`` with singular values in descending order; the subscript ``r`` keeps the top ``r``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "SVDMethod",
    "top_r_svd",
    "thin_qr",
    "principal_weight",
    "residual_weight",
    "orthonormality_error",
    "optimal_residual_norm",
    "low_rank_svd",
    "low_rank_frobenius_norm",
]

SVDMethod = Literal["auto", "gram", "full"]


def _compute_dtype(w: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _full_svd(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # cuSOLVER's default (gesvdj) missed top singular values of SmolLM2 by 1.2e-4 on an H100; gesvd: 1e-5.
    driver = "gesvd" if w.is_cuda else None
    U, S, Vh = torch.linalg.svd(w, full_matrices=False, driver=driver)
    return U[..., :r], S[..., :r], Vh[..., :r, :].mT


def _gram_rayleigh_ritz(w: torch.Tensor, r: int, oversample: int) -> tuple[torch.Tensor, ...]:
    """Top-r SVD of a tall-or-square ``w`` (m >= n) from the eigenvectors of its Gram matrix.

    The eigendecomposition of ``W^T W`` (n×n) gives a basis ``V0`` of the dominant right subspace, with
    ``k = r + oversample`` columns. Its eigenvalues alone would square the condition number, so the
    singular triplets are recovered by a Rayleigh–Ritz step instead: the thin SVD of the small ``W V0``
    (m×k), done in float64 because it is cheap, gives singular values accurate to the working precision
    relative to each σ_i, and the principal part ``W V V^T`` is an orthogonal projection of ``W``, so its
    residual exceeds the optimal one only to second order in the subspace error.
    """
    n = w.shape[-1]
    k = min(n, r + oversample)
    gram = w.mT @ w
    _, eigenvectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = eigenvectors[..., -k:].double()  # (..., n, k)
    # cuSOLVER's eigh returned vectors orthonormal only to ~5e-4 for small Grams on an H100; one Cholesky
    # QR step in float64 makes the basis orthonormal again, so W V Vᵀ below is a true projection.
    chol = torch.linalg.cholesky(basis.mT @ basis)
    basis = torch.linalg.solve_triangular(chol, basis.mT, upper=False).mT
    projected = (w @ basis.to(w.dtype)).double()  # (..., m, k)
    U_k, S_k, Qh = torch.linalg.svd(projected, full_matrices=False)
    V_k = basis @ Qh.mT  # (..., n, k)
    return U_k[..., :r], S_k[..., :r], V_k[..., :r]


def top_r_svd(
    w: torch.Tensor,
    r: int,
    method: SVDMethod = "auto",
    dtype: torch.dtype | None = None,
    oversample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` leading singular triplets of ``w`` without a full SVD of large matrices.

    Args:
        w: Weights of shape ``(..., m, n)``; any leading dimensions are a batch of same-shape matrices.
        r: How many triplets to keep, ``1 <= r <= min(m, n)``.
        method: ``"gram"``: eigendecomposition of the smaller Gram matrix followed by a float64
            Rayleigh–Ritz step (exact to working precision, the fast path on GPUs); ``"full"``:
            ``torch.linalg.svd`` of the whole matrix, the reference; ``"auto"``: ``"full"`` for small
            matrices or ranks close to ``min(m, n)``, ``"gram"`` otherwise.
        dtype: Working precision; default float32 (float64 if ``w`` is float64).
        oversample: Extra Gram eigenvectors kept for the Rayleigh–Ritz step (default ``max(8, r // 4)``).

    Returns:
        ``U`` ``(..., m, r)``, ``S`` ``(..., r)`` descending, ``V`` ``(..., n, r)`` in ``dtype``, with
        ``w ≈ U diag(S) V^T``.
    """
    m, n = w.shape[-2:]
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be between 1 and min(m, n)={min(m, n)} for a {m}×{n} matrix")
    if method not in ("auto", "gram", "full"):
        raise ValueError(f"unknown svd method {method!r}; choose one of: auto, full, gram")
    work_dtype = _compute_dtype(w, dtype)
    work = w.to(work_dtype)
    if oversample is None:
        oversample = max(8, r // 4)
    if method == "auto":
        method = "full" if min(m, n) <= 256 or r + oversample >= min(m, n) else "gram"
    if method == "full":
        U, S, V = _full_svd(work, r)
    elif m >= n:
        U, S, V = _gram_rayleigh_ritz(work, r, oversample)
    else:  # decompose the transpose so the Gram matrix is the smaller one
        V, S, U = _gram_rayleigh_ritz(work.mT, r, oversample)
    return U.to(work_dtype), S.to(work_dtype), V.to(work_dtype)


def thin_qr(w: torch.Tensor, r: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``r`` columns of ``Q`` and rows of ``R`` in ``w = Q R`` (OLoRA's initialisation).

    Householder QR processes columns left to right, so ``Q[:, :r]`` depends only on ``w[:, :r]`` and
    ``R[:r, :] = Q[:, :r]^T w``: the QR of an m×r slice replaces the QR of the whole matrix.

    Args:
        w: ``(..., m, n)`` weights.
        r: ``1 <= r <= min(m, n)``.
        dtype: Working precision (default float32, or float64 for float64 input).

    Returns:
        ``Q_r`` ``(..., m, r)`` with orthonormal columns and ``R_r`` ``(..., r, n)``.
    """
    m, n = w.shape[-2:]
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be between 1 and min(m, n)={min(m, n)} for a {m}×{n} matrix")
    work = w.to(_compute_dtype(w, dtype))
    Q_r, _ = torch.linalg.qr(work[..., :, :r], mode="reduced")
    return Q_r, Q_r.mT @ work


def principal_weight(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``U diag(S) V^T`` of shape ``(..., m, n)`` from ``U`` (..., m, r), ``S`` (..., r), ``V`` (..., n, r)."""
    return (U * S.unsqueeze(-2)) @ V.mT


def residual_weight(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``w - delta`` formed in float32 (or better) and cast back to ``w``'s dtype.

    ``delta`` must be computed from the factors *as stored* (after their cast to the adapter dtype), so
    that base + adapter reproduces ``w`` up to the storage dtype's rounding.
    """
    work_dtype = torch.promote_types(_compute_dtype(w, None), delta.dtype)
    return (w.to(work_dtype) - delta.to(work_dtype)).to(w.dtype)


def orthonormality_error(X: torch.Tensor) -> torch.Tensor:
    """``‖X^T X − I_r‖_F`` for ``X`` of shape ``(..., d, r)``; returns shape ``(...)``."""
    gram = X.mT @ X
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return torch.linalg.matrix_norm(gram - eye, ord="fro")


def optimal_residual_norm(S_all: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart–Young bound ``sqrt(Σ_{i>r} σ_i²)`` from all singular values ``S_all`` (..., k)."""
    return S_all[..., r:].pow(2).sum(-1).sqrt()


def low_rank_svd(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``P Qᵀ`` without forming it: ``P`` (..., m, k), ``Q`` (..., n, k), k ≪ m, n.

    ``P = Q_P R_P`` and ``Q = Q_Q R_Q`` reduce the problem to the k×k matrix ``R_P R_Qᵀ``.

    Returns:
        ``U`` (..., m, k), ``S`` (..., k) descending, ``V`` (..., n, k) with ``P Qᵀ = U diag(S) Vᵀ``.
    """
    Q_P, R_P = torch.linalg.qr(P, mode="reduced")
    Q_Q, R_Q = torch.linalg.qr(Q, mode="reduced")
    U_small, S, Vh_small = torch.linalg.svd(R_P @ R_Q.mT, full_matrices=False)
    return Q_P @ U_small, S, Q_Q @ Vh_small.mT


def low_rank_frobenius_norm(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``‖P Qᵀ‖_F`` from the k×k Gram matrices: ``sqrt(trace((PᵀP)(QᵀQ)))``; shape ``(...)``."""
    return ((P.mT @ P) * (Q.mT @ Q)).sum((-2, -1)).clamp_min(0).sqrt()
