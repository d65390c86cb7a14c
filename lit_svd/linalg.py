"""Pure tensor maths behind every adapter: top-r SVD, thin QR, residuals and spectral metrics.

Tensors in, tensors out: nothing here knows about ``nn.Module`` or Lightning, so each function can be
tested alone against a float64 reference. Every function accepts a leading batch dimension so that all
same-shape weights of a model are decomposed in one call.

Notation (SPEC §2): a weight ``W`` has shape ``(m, n) = (out_features, in_features)``; its thin SVD is
``W = U diag(S) V^T`` with singular values in descending order; the subscript ``r`` keeps the top ``r``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor

__all__ = [
    "SVDMethod",
    "top_r_svd",
    "bottom_r_svd",
    "thin_qr",
    "corda_factors",
    "damped_inverse",
    "pca_components",
    "loraga_factors",
    "principal_weight",
    "residual_weight",
    "full_tensor",
    "local_tensor",
    "row_shard",
    "orthonormality_error",
    "orthonormality_error_and_gradient",
    "optimal_residual_norm",
    "low_rank_svd",
    "low_rank_frobenius_norm",
    "low_rank_singular_values",
    "low_rank_difference_norm",
    "low_rank_grams",
    "frobenius_norm_from_grams",
    "singular_values_from_grams",
]

SVDMethod = Literal["auto", "subspace", "gram", "full"]


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


def _orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``X`` (..., n, k): Cholesky QR twice, Householder QR if that fails.

    Two Cholesky-QR passes are as accurate as Householder QR for condition numbers up to ~1/sqrt(eps)
    and are two batched GEMMs plus a k×k factorisation, where a batched Householder QR is far slower on GPUs.
    """
    X = X / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(X.mT @ X)
        if bool((info != 0).any()):
            return torch.linalg.qr(X, mode="reduced")[0]
        X = torch.linalg.solve_triangular(chol, X.mT, upper=False).mT
    return X


def _gram_matrix(w: torch.Tensor) -> torch.Tensor:
    """``wᵀ w`` (..., n, n) in float64; bf16/fp16 CUDA weights use a tensor-core GEMM with float32 output.

    Products of bf16 numbers are exact in float32, so only the float32 accumulation rounds; the Gram matrix
    only steers the subspace iteration (the singular values come from ``w`` itself), which tolerates that.
    """
    m, n = w.shape[-2:]
    if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16):
        flat = w.reshape(-1, m, n)
        try:
            return torch.bmm(flat.mT, flat, out_dtype=torch.float32).reshape(*w.shape[:-2], n, n).double()
        except (RuntimeError, TypeError):  # a torch without the out_dtype overload
            pass
    return torch.cat([chunk.mT @ chunk for chunk in _float64_slices(w)]).reshape(*w.shape[:-2], n, n)


def _float64_slices(w: torch.Tensor, max_bytes: int = 1 << 30):
    """Float64 copies of successive slices of the flattened batch of ``w``, each at most ~``max_bytes``."""
    flat = w.reshape(-1, *w.shape[-2:])
    per_slice = max(1, max_bytes // (8 * flat[0].numel()))
    for start in range(0, flat.shape[0], per_slice):
        yield flat[start : start + per_slice].double()


def _chebyshev_filter(gram: torch.Tensor, X: torch.Tensor, degree: int, cut: torch.Tensor) -> torch.Tensor:
    """``T_d((2G − cut·I)/cut) X``: damps eigenvalues in [0, cut] to at most 1, grows those above like cosh.

    ``cut`` has shape ``(...)``; the polynomial is the Chebyshev polynomial of the first kind mapped from
    [-1, 1] onto [0, cut], evaluated by its three-term recurrence (one product with ``gram`` per degree).
    """
    half = (cut / 2).unsqueeze(-1).unsqueeze(-1)
    previous, current = X, (gram @ X - half * X) / half
    for _ in range(degree - 1):
        previous, current = current, 2 * (gram @ current - half * current) / half - previous
    return current


def _rayleigh_ritz(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of ``w`` within the column space ``basis`` (..., n, k), from ``w`` itself.

    Returns ``θ`` (..., k) descending (the squared singular values of ``w @ basis``), the rotated basis
    ``basis Y`` and ``w basis Y`` (..., m, k), all float64, with Y the eigenvectors of ``(w B)ᵀ (w B)``.
    """
    flat_basis = basis.reshape(-1, *basis.shape[-2:])
    products, start = [], 0
    for chunk in _float64_slices(w):  # bounded float64 copies of w: a chunk of 7B weights is several GiB
        products.append(chunk @ flat_basis[start : start + chunk.shape[0]])
        start += chunk.shape[0]
    projected = torch.cat(products).reshape(*w.shape[:-1], basis.shape[-1])
    eigenvalues, rotation = torch.linalg.eigh(projected.mT @ projected)
    eigenvalues, rotation = eigenvalues.flip(-1), rotation.flip(-1)
    return eigenvalues.clamp_min(0), basis @ rotation, projected @ rotation


def _filtered_subspace_iteration(
    w: torch.Tensor,
    r: int,
    oversample: int,
    tol: float = 1e-7,
    max_rounds: int = 12,
    max_degree: int = 16,
    growth_limit: float = 1e12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of a tall-or-square ``w`` (m >= n) by Chebyshev-filtered subspace iteration on ``wᵀ w``.

    Only a block of ``k = r + oversample`` vectors is iterated, so the cost is a few dozen (n×n)·(n×k)
    products instead of a full n×n eigendecomposition. Each round applies a Chebyshev polynomial that
    damps the unwanted part of the spectrum, [0, θ_k] with θ_k the smallest current Ritz value (a lower
    bound of λ_k, so nothing wanted is damped), re-orthonormalises, and extracts Ritz pairs from ``w``
    itself in float64 (so σ is accurate relative to each σ_i, not to σ_1 as Gram eigenvalues would be).
    The degree keeps the growth at the top of the spectrum below ``growth_limit`` so that the weakest
    wanted directions survive the float64 re-orthonormalisation. It stops when the top-r Ritz values of
    every matrix changed by less than ``tol`` (relative) in a round; any matrix that has not converged
    after ``max_rounds`` is recomputed with a full eigendecomposition (``_gram_rayleigh_ritz``).
    """
    n = w.shape[-1]
    k = min(n, r + oversample)
    gram = _gram_matrix(w)
    generator = torch.Generator(device=w.device).manual_seed(0)
    basis = torch.randn(*w.shape[:-2], n, k, dtype=torch.float64, device=w.device, generator=generator)
    for _ in range(2):  # two plain power steps give usable spectrum bounds for the first filter
        basis = _orthonormalize(gram @ basis)
    theta, basis, projected = _rayleigh_ritz(w, basis)
    converged = torch.zeros(theta.shape[:-1], dtype=torch.bool, device=w.device)
    previous_change = torch.ones_like(theta[..., 0])
    for _ in range(max_rounds):
        top = theta[..., 0]
        cut = torch.maximum(theta[..., -1], top * 1e-12 + torch.finfo(torch.float64).tiny)
        x_top = (2 * top / cut - 1).clamp_min(1.0 + 1e-12)
        degree = int((math.acosh(growth_limit) / torch.acosh(x_top)).floor().clamp(1, max_degree).min())
        basis = _orthonormalize(_chebyshev_filter(gram, basis, degree, cut))
        new_theta, basis, projected = _rayleigh_ritz(w, basis)
        change = ((new_theta[..., :r] - theta[..., :r]).abs() / new_theta[..., :r].clamp_min(1e-300)).amax(-1)
        theta = new_theta
        # Ritz values converge geometrically, so the next change (≈ the error left) is about change²/previous.
        converged = (change <= tol) | (change * change <= tol * previous_change)
        previous_change = change
        if bool(converged.all()):
            break
    sigma = theta[..., :r].sqrt()
    U = projected[..., :r] / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    V = basis[..., :r]
    if not bool(converged.all()):
        # Rare (e.g. a nearly flat spectrum around σ_r): exact eigendecomposition for the matrices left over.
        batch_shape, m = w.shape[:-2], w.shape[-2]
        U, sigma, V = U.reshape(-1, m, r).clone(), sigma.reshape(-1, r).clone(), V.reshape(-1, n, r).clone()
        redo = (~converged.reshape(-1)).nonzero().squeeze(-1)
        U_e, S_e, V_e = _gram_rayleigh_ritz(w.reshape(-1, m, n)[redo].double(), r, oversample)
        U[redo], sigma[redo], V[redo] = U_e, S_e, V_e
        U, sigma, V = U.reshape(*batch_shape, m, r), sigma.reshape(*batch_shape, r), V.reshape(*batch_shape, n, r)
    return U, sigma, V


def bottom_r_svd(
    w: torch.Tensor, r: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` *smallest* singular triplets of ``w`` (MiLoRA's minor components), from a full float64 SVD.

    The bottom of the spectrum is where fast eigensolvers lose accuracy: a Gram-matrix eigensolver squares
    the condition number and iterative ones converge to the top first, so this takes ``torch.linalg.svd``
    of the whole matrix in float64 (a few seconds for a 4096×11008 matrix on a GPU).

    Args:
        w: Weights of shape ``(..., m, n)``.
        r: How many triplets, ``1 <= r <= min(m, n)``.
        dtype: Precision of the returned factors; default float32 (float64 if ``w`` is float64).

    Returns:
        ``U`` ``(..., m, r)``, ``S`` ``(..., r)`` descending (the r smallest), ``V`` ``(..., n, r)``.
    """
    m, n = w.shape[-2:]
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be between 1 and min(m, n)={min(m, n)} for a {m}×{n} matrix")
    out = dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return U[..., -r:].to(out), S[..., -r:].to(out), Vh[..., -r:, :].mT.to(out)


def _subspace_pays(device: torch.device, r: int, smaller_dim: int, oversample: int | None = None) -> bool:
    """Whether the filtered subspace iteration beats a full eigendecomposition: on accelerators, when its block of
    ``r + oversample`` vectors (default oversample ``max(16, r // 2)``) is at most a quarter of the smaller
    dimension. On CPUs LAPACK's eigh is fast enough that the full path wins (SmolLM2, r=16: 3.6 s vs 4.9 s)."""
    block = r + (max(16, r // 2) if oversample is None else oversample)
    return device.type != "cpu" and block <= smaller_dim // 4


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
        method: ``"subspace"``: Chebyshev-filtered subspace iteration on the smaller Gram matrix with
            float64 Rayleigh–Ritz steps taken on ``w`` itself, iterated until the top-r singular values
            stop changing (the fast path when ``r`` is small next to ``min(m, n)``); ``"gram"``: full
            eigendecomposition of the smaller Gram matrix, then the same float64 Rayleigh–Ritz step;
            ``"full"``: ``torch.linalg.svd`` of the whole matrix, the reference; ``"auto"``: ``"full"``
            for small matrices, ``"subspace"`` on GPUs when ``r + oversample <= min(m, n) / 4``, else ``"gram"``.
            All three agree to working precision (tests/test_linalg.py).
        dtype: Precision of the returned factors; default float32 (float64 if ``w`` is float64).
        oversample: Extra vectors carried beyond ``r`` (default ``max(16, r // 2)`` for ``"subspace"``,
            ``max(8, r // 4)`` for ``"gram"``); more widen the spectral gap the iteration converges with.

    Returns:
        ``U`` ``(..., m, r)``, ``S`` ``(..., r)`` descending, ``V`` ``(..., n, r)`` in ``dtype``, with
        ``w ≈ U diag(S) V^T``.
    """
    m, n = w.shape[-2:]
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank r={r} must be between 1 and min(m, n)={min(m, n)} for a {m}×{n} matrix")
    if method not in ("auto", "subspace", "gram", "full"):
        raise ValueError(f"unknown svd method {method!r}; choose one of: auto, full, gram, subspace")
    work_dtype = _compute_dtype(w, dtype)
    if method == "auto":
        if min(m, n) <= 256:
            method = "full"
        elif _subspace_pays(w.device, r, min(m, n), oversample):
            method = "subspace"
        else:
            method = "gram"
    if oversample is None:
        oversample = max(16, r // 2) if method == "subspace" else max(8, r // 4)
    if method == "subspace":
        # Takes w as stored (e.g. bf16): it only ever reads it through float64 or tensor-core products.
        if m >= n:
            U, S, V = _filtered_subspace_iteration(w, r, oversample)
        else:
            V, S, U = _filtered_subspace_iteration(w.mT, r, oversample)
        return U.to(work_dtype), S.to(work_dtype), V.to(work_dtype)
    work = w.to(work_dtype)
    if method == "full":
        U, S, V = _full_svd(work, r)
    elif m >= n:
        U, S, V = _gram_rayleigh_ritz(work, r, oversample)
    else:  # decompose the transpose so the Gram matrix is the smaller one
        V, S, U = _gram_rayleigh_ritz(work.mT, r, oversample)
    return U.to(work_dtype), S.to(work_dtype), V.to(work_dtype)


def damped_inverse(C: torch.Tensor, damp: float = 0.01, tolerance: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_d, C_d⁻¹)`` with ``C_d = C + δ·mean(diag C)·I``: δ starts at ``damp`` and doubles until
    ``‖C_d C_d⁻¹ − I‖_F < tolerance`` (CorDA's regularisation of a covariance that may be rank-deficient,
    e.g. from fewer calibration tokens than features; PEFT's rule, kept so factors match).

    Args:
        C: Covariances ``(..., n, n)``; each matrix of a batch gets its own δ.

    Returns:
        ``C_d`` and ``C_d⁻¹``, both ``(..., n, n)``; compute them once for weights that share one ``C``
        (CorDA's q/k/v projections read the same input) and pass them to ``corda_factors(damped=...)``.
    """
    n = C.shape[-1]
    flat = C.reshape(-1, n, n)
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    mean_diagonal = flat.diagonal(dim1=-2, dim2=-1).mean(-1)
    damped = inverse = None
    pending = list(range(flat.shape[0]))
    while pending:  # one batched inverse per doubling of δ, for the matrices not yet accepted
        index = torch.tensor(pending, device=C.device)
        trial = flat[index] + eye * (mean_diagonal[index] * damp)[:, None, None]
        trial_inverse = torch.linalg.inv(trial)
        errors = torch.linalg.matrix_norm(trial @ trial_inverse - eye).tolist()  # one transfer per round
        if damped is None:
            if max(errors) < tolerance:  # the usual case: every matrix accepted at once, no copies
                return trial.reshape(C.shape), trial_inverse.reshape(C.shape)
            damped, inverse = torch.empty_like(flat), torch.empty_like(flat)
        for position, (i, error) in enumerate(zip(pending, errors, strict=True)):
            if error < tolerance:
                damped[i], inverse[i] = trial[position], trial_inverse[position]
        pending = [i for i, error in zip(pending, errors, strict=True) if error >= tolerance]
        damp *= 2
    return damped.reshape(C.shape), inverse.reshape(C.shape)


def corda_factors(
    w: torch.Tensor,
    C: torch.Tensor,
    r: int,
    mode: Literal["ipm", "kpm"] = "ipm",
    dtype: torch.dtype | None = None,
    damped: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA's context-oriented decomposition (Yang et al. 2024, arXiv 2406.05223, §3.2) of one weight.

    ``W C_d = U diag(S) Vᵀ`` (C_d: the damped input covariance, ``damped_inverse``), so
    ``W = U diag(S) (C_d⁻¹ V)ᵀ`` exactly. The instruction-previewed mode (``"ipm"``) keeps the ``r``
    largest components, the ones the task's inputs excite most; the knowledge-preserving mode (``"kpm"``)
    keeps the ``r`` smallest, so the components that carry the calibration (world-knowledge) data stay
    frozen in the residual.

    Args:
        w: Weight ``(..., m, n)``; a batch of weights is decomposed in one call.
        C: Input covariance ``(..., n, n)`` (symmetric positive semi-definite), broadcast against ``w``: one
            ``(n, n)`` matrix serves a whole batch of weights that read the same input.
        r: Number of components, ``1 <= r <= min(m, n)``.
        mode: ``"ipm"`` (largest r) or ``"kpm"`` (smallest r).
        dtype: Working precision; default float32 (float64 if ``w`` is float64).
        damped: ``damped_inverse(C)`` in the working precision, if already computed (``C`` is then not read).

    Returns:
        ``U`` ``(..., m, r)``, ``S`` ``(..., r)``, ``V̂ = C_d⁻¹ V`` ``(..., n, r)`` (not orthonormal) with the
        component ``U diag(S) V̂ᵀ`` of ``W``.
    """
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"CorDA mode must be 'ipm' or 'kpm', got {mode!r}")
    work = _compute_dtype(w, dtype)
    damped, inverse = damped_inverse(C.to(work)) if damped is None else damped
    product = w.to(work) @ damped
    U, S, V = top_r_svd(product, r, dtype=work) if mode == "ipm" else bottom_r_svd(product, r, dtype=work)
    # V̂ᵀ = Vᵀ C_d⁻¹ with the explicit inverse the damping loop accepted.
    return U, S, inverse.mT @ V


def loraga_factors(
    G: torch.Tensor, r: int, gamma: float = 16.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's factors (Wang et al., 2024, arXiv 2407.05000) from the averaged full-weight gradient ``G``.

    ``G = U diag(S) Vᵀ`` (top 2r triplets): ``A = V_{:r}ᵀ`` and ``B = U_{r:2r} diag(S_{r:2r}) · m^{1/4}/√γ``, the
    component split and "stable" scale of PEFT 0.21's ``LoraGAConfig`` defaults (``direction="ArB2r"``,
    ``scale="stable"``, ``stable_gamma=16``), so that the first step of ``B A`` follows the leading part of the
    full fine-tuning gradient.

    Args:
        G: Gradient of the loss with respect to ``W`` ``(..., m, n)``, averaged over the calibration batches;
            a batch of same-shape gradients is decomposed in one call.
        r: Adapter rank; ``2r <= min(m, n)``.
        gamma: γ of the stable scale.
        dtype: Working precision; default float32 (float64 if ``G`` is float64).

    Returns:
        ``A`` ``(..., r, n)`` and ``B`` ``(..., m, r)``.
    """
    work = _compute_dtype(G, dtype)
    U, S, V = top_r_svd(G.to(work), 2 * r, dtype=work)
    scale = G.shape[-2] ** 0.25 / gamma**0.5
    return V[..., :r].mT.contiguous(), (U[..., r:] * S[..., None, r:] * scale).contiguous()


def pca_components(
    covariance: torch.Tensor, r: int, method: Literal["auto", "eigh", "subspace"] = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` principal directions of data whose (centred) covariance is ``covariance`` (..., n, n).

    They are the right singular vectors of the centred activation matrix (EVA, Paischer et al. 2024,
    arXiv 2410.07170), computed in float64 from the n×n covariance. Each direction's sign is fixed so that
    its largest-magnitude entry is positive (determinism across runs and ranks).

    Args:
        covariance: ``(..., n, n)`` symmetric positive semi-definite; a batch is decomposed in one call.
        r: Number of directions, ``1 <= r <= n``.
        method: ``"eigh"``: the full eigendecomposition, exact; ``"subspace"``: only the top ``r`` eigenpairs,
            by ``top_r_svd``'s filtered subspace iteration (for a positive semi-definite matrix the singular
            triplets are the eigenpairs), a few dozen (n×n)·(n×k) products instead of an n×n ``eigh`` (tens
            of seconds per 7B model on a GPU in float64); ``"auto"``: ``"subspace"`` on GPUs when
            ``r + 16 <= n / 4`` (as ``top_r_svd`` chooses), else ``"eigh"``.

    Returns:
        ``V`` ``(..., n, r)`` orthonormal columns, and the explained-variance ratios ``(..., r)`` (eigenvalue
        over the trace, descending).
    """
    n = covariance.shape[-1]
    if not 1 <= r <= n:
        raise ValueError(f"r={r} components must be between 1 and n={n}")
    if method not in ("auto", "eigh", "subspace"):
        raise ValueError(f"unknown pca method {method!r}; choose one of: auto, eigh, subspace")
    if method == "auto":
        method = "subspace" if _subspace_pays(covariance.device, r, n) else "eigh"
    work = covariance.double()
    if method == "eigh":
        evals, evecs = torch.linalg.eigh(work)
        evals, evecs = evals.flip(-1)[..., :r], evecs.flip(-1)[..., :r]
    else:
        _, evals, evecs = top_r_svd(work, r, method="subspace")
    signs = torch.sign(evecs.gather(-2, evecs.abs().argmax(-2, keepdim=True)))
    trace = work.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    ratio = evals.clamp_min(0) / trace.clamp_min(torch.finfo(torch.float64).tiny)
    out = covariance.dtype if covariance.dtype == torch.float64 else torch.float32
    return (evecs * signs).to(out), ratio.to(out)


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


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` (e.g. an FSDP2 shard) gathered into an ordinary tensor; any other tensor as it is.

    Gathering is a collective: under FSDP every rank must call it for the same tensors in the same order.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (an FSDP2 shard; no communication); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def row_shard(matrix: torch.Tensor) -> tuple[torch.Tensor, slice, Any]:
    """The rows of ``matrix`` (m, n) held by this rank, which rows of the whole they are, and the process
    group whose ranks hold the rest: ``(rows, slice of range(m), group)``.

    For an FSDP2 ``DTensor`` sharded along dim 0 no communication happens (a row-wise quantity summed over
    ``group`` is the whole's); any other ``DTensor`` layout is gathered (``group`` None), and an ordinary
    tensor is all rows.
    """
    if not isinstance(matrix, DTensor):
        return matrix, slice(None), None
    if matrix.device_mesh.ndim != 1 or not (matrix.placements[0].is_shard() and matrix.placements[0].dim == 0):
        return matrix.full_tensor(), slice(None), None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = matrix.to_local()
    _, offset = compute_local_shape_and_global_offset(matrix.shape, matrix.device_mesh, matrix.placements)
    return local, slice(offset[0], offset[0] + local.shape[0]), matrix.device_mesh.get_group()


def orthonormality_error(X: torch.Tensor) -> torch.Tensor:
    """``‖X^T X − I_r‖_F`` for ``X`` of shape ``(..., d, r)``; returns shape ``(...)``."""
    return orthonormality_error_from_gram(X.mT @ X)


def orthonormality_error_and_gradient(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``E = ‖XᵀX − I_r‖_F`` and its gradient ``∂E/∂X = 2·X(XᵀX − I_r)/E`` in closed form.

    Args:
        X: (..., d, r).

    Returns:
        ``E`` (...) and ``∂E/∂X`` (..., d, r) — what autograd gives for :func:`orthonormality_error`, without
        recording a graph (the regulariser's step then costs two batched matmuls per factor shape). Where
        ``E`` is 0 the gradient is 0.
    """
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    deviation = X.mT @ X - eye
    error = torch.linalg.matrix_norm(deviation, ord="fro")
    scale = torch.where(error > 0, 2 / error, torch.zeros_like(error))
    return error, (X @ deviation) * scale[..., None, None]


def orthonormality_error_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """``‖G − I_r‖_F`` for a Gram matrix ``G = XᵀX`` of shape ``(..., r, r)``; returns shape ``(...)``."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
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
    return frobenius_norm_from_grams(P.mT @ P, Q.mT @ Q)


def low_rank_difference_norm(
    P_1: torch.Tensor, Q_1: torch.Tensor, P_0: torch.Tensor, Q_0: torch.Tensor
) -> torch.Tensor:
    """``‖P_1 Q_1ᵀ − P_0 Q_0ᵀ‖_F`` of two low-rank products without cancellation; shape ``(...)``.

    The difference is written as ``ΔP Q_1ᵀ + P_0 ΔQᵀ`` with ``ΔP = P_1 − P_0`` and ``ΔQ = Q_1 − Q_0``, so

        ‖·‖² = ⟨ΔPᵀΔP, Q_1ᵀQ_1⟩ + 2 ⟨ΔPᵀP_0, Q_1ᵀΔQ⟩ + ⟨P_0ᵀP_0, ΔQᵀΔQ⟩

    (six k×k Gram-type products; only the first term when ``Q_1`` is ``Q_0``). Every term is of the size of
    the difference itself, so the result stays accurate in float32 even when the two products nearly
    coincide, where expanding ``‖P_1 Q_1ᵀ‖² − 2⟨·,·⟩ + ‖P_0 Q_0ᵀ‖²`` would lose it to rounding.

    Args:
        P_1: (..., m, k) left factor of the first product.
        Q_1: (..., n, k) right factor of the first product.
        P_0: (..., m, k) left factor of the product subtracted.
        Q_0: (..., n, k) right factor of the product subtracted.
    """
    dP = P_1 - P_0
    if Q_1 is Q_0:  # a shared right factor (e.g. OSoRA's frozen V): the difference is ΔP Qᵀ
        return low_rank_frobenius_norm(dP, Q_1)
    dQ = Q_1 - Q_0
    squared = (
        ((dP.mT @ dP) * (Q_1.mT @ Q_1)).sum((-2, -1))
        + 2 * ((dP.mT @ P_0) * (Q_1.mT @ dQ)).sum((-2, -1))
        + ((P_0.mT @ P_0) * (dQ.mT @ dQ)).sum((-2, -1))
    )
    return squared.clamp_min(0).sqrt()


def low_rank_grams(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 Gram matrices ``PᵀP`` and ``QᵀQ`` (..., k, k) of the factors of ``P Qᵀ``, on their device.

    The norm and the singular values of ``P Qᵀ`` follow from these two small matrices alone
    (``frobenius_norm_from_grams``, ``singular_values_from_grams``), so a whole stack of layers costs two
    batched GEMMs on the device and a transfer of ``2 k²`` numbers per layer.

    Args:
        P: (..., m, k); Q: (..., n, k), any floating dtype.

    Returns:
        ``(PᵀP, QᵀQ)``, each (..., k, k) float64.
    """
    P, Q = P.double(), Q.double()
    return P.mT @ P, Q.mT @ Q


def frobenius_norm_from_grams(gram_P: torch.Tensor, gram_Q: torch.Tensor) -> torch.Tensor:
    """``‖P Qᵀ‖_F = sqrt(Σ_ij (PᵀP)_ij (QᵀQ)_ij)`` from ``gram_P``, ``gram_Q`` (..., k, k); shape ``(...)``.

    Rounding can make the sum slightly negative when ``P Qᵀ`` is (nearly) zero; it is clamped to 0.
    """
    return (gram_P * gram_Q).sum((-2, -1)).clamp_min(0).sqrt()


def singular_values_from_grams(gram_P: torch.Tensor, gram_Q: torch.Tensor) -> torch.Tensor:
    """Singular values of ``P Qᵀ`` (descending) from ``gram_P = PᵀP`` and ``gram_Q = QᵀQ``, both (..., k, k).

    ``σ(P Qᵀ)² = eig(Lᵀ G_Q L)`` for any ``L`` with ``L Lᵀ = G_P``: the Cholesky factor where ``G_P`` is
    positive definite (one cheap factorisation and one eigenvalue-only solve per matrix), else the symmetric
    square root ``G_P^{1/2}`` from ``eigh`` with negative rounding eigenvalues clamped to 0, which stays valid
    when ``P`` is rank-deficient (e.g. LoRA's ``B = 0``). Meant for float64 CPU tensors, where a batch of
    k×k problems takes milliseconds.

    Returns:
        (..., k), in the dtype and on the device of the inputs.
    """
    k = gram_P.shape[-1]
    flat_P, flat_Q = gram_P.reshape(-1, k, k), gram_Q.reshape(-1, k, k)
    L, info = torch.linalg.cholesky_ex(flat_P)
    singular = (info != 0).nonzero().squeeze(-1)
    if singular.numel():
        eigenvalues, eigenvectors = torch.linalg.eigh(flat_P[singular])
        L[singular] = (eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)) @ eigenvectors.mT
    squared = torch.linalg.eigvalsh(L.mT @ flat_Q @ L)
    return squared.flip(-1).clamp_min(0).sqrt().reshape(gram_P.shape[:-1])


def low_rank_singular_values(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Singular values of ``P Qᵀ`` (descending, float64, on the CPU) from two k×k Gram matrices.

    The device does two thin GEMMs (``low_rank_grams``) and the k×k eigenproblems run on the CPU in float64
    (``singular_values_from_grams``), instead of a QR and an SVD launched on the device per call (what
    ``low_rank_svd`` does, to get the vectors too).

    Args:
        P: (..., m, k); Q: (..., n, k).

    Returns:
        (..., k) float64 CPU tensor.
    """
    gram_P, gram_Q = torch.stack(low_rank_grams(P, Q)).cpu()  # one transfer
    return singular_values_from_grams(gram_P, gram_Q)
