"""float64 checks of the pure tensor maths in lit_svd.linalg."""

from __future__ import annotations

import pytest
import torch

from lit_svd.linalg import (
    low_rank_difference_norm,
    low_rank_frobenius_norm,
    low_rank_svd,
    optimal_residual_norm,
    orthonormality_error,
    orthonormality_error_and_gradient,
    principal_weight,
    residual_weight,
    thin_qr,
    top_r_svd,
)


def spectrum_matrix(m: int, n: int, batch: int = 3, seed: int = 0, decay: float = 0.97) -> torch.Tensor:
    """Batch of (m, n) float64 matrices with a slowly decaying, LLM-like spectrum (small gaps)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))
    S = decay ** torch.arange(k, dtype=torch.float64) * (
        1 + 0.01 * torch.rand(batch, k, generator=g, dtype=torch.float64)
    )
    S = S.sort(dim=-1, descending=True).values
    return principal_weight(U, S, V)


@pytest.mark.parametrize("method", ["subspace", "gram", "full", "auto"])
@pytest.mark.parametrize(("m", "n", "r"), [(300, 120, 16), (120, 300, 16), (256, 256, 64), (64, 48, 48)])
def test_top_r_svd_matches_float64_reference(method, m, n, r):
    w64 = spectrum_matrix(m, n)
    S_ref = torch.linalg.svdvals(w64)
    U, S, V = top_r_svd(w64.float(), r, method=method)
    assert U.shape == (3, m, r) and S.shape == (3, r) and V.shape == (3, n, r)
    assert U.dtype == torch.float32
    rel = ((S.double() - S_ref[:, :r]).abs() / S_ref[:, :r]).max().item()
    assert rel < 1e-5, rel
    residual = torch.linalg.matrix_norm(w64 - principal_weight(U.double(), S.double(), V.double()))
    # Rounding, not the algorithm, sets the floor where the optimum is 0 (r = min(m, n)): the float32 copy
    # of W, the float32 SVD (backward stable: ‖ΔW‖ ≤ p(m, n)·u·‖W‖ with p a low-degree polynomial whose
    # size depends on the BLAS/LAPACK blocking) and the float32 factors. p = max(m, n) is the usual
    # first-order form. LAPACK's float32 SVD ("full") leaves 15–18·u on these 64×48 matrices (measured
    # with MKL; the float64 Rayleigh–Ritz paths 1–2.4·u), which a fixed 1e-6·‖W‖ (~17·u) did not allow.
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    slack = max(m, n) * unit_roundoff * torch.linalg.matrix_norm(w64)
    assert (residual <= (1 + 1e-5) * optimal_residual_norm(S_ref, r) + slack).all()
    assert orthonormality_error(U.double()).max() < 1e-5
    assert orthonormality_error(V.double()).max() < 1e-5


def test_top_r_svd_float64_is_exact_to_float64():
    w64 = spectrum_matrix(200, 90, batch=2)
    _, S, _ = top_r_svd(w64, 10, method="gram")
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, torch.linalg.svdvals(w64)[:, :10], rtol=1e-10, atol=0)


def test_subspace_iteration_on_hard_spectra():
    """Flat random (Marchenko–Pastur) and steep power-law spectra, bf16 input as stored in models."""
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(2, 600, 500, generator=g).bfloat16()
    U0, _ = torch.linalg.qr(torch.randn(600, 500, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(500, 500, generator=g, dtype=torch.float64))
    steep = principal_weight(U0, 50 * torch.arange(1, 501, dtype=torch.float64) ** -1.2, V0)[None]
    for w, r in ((flat, 32), (steep, 40)):
        S_ref = torch.linalg.svdvals(w.double())
        U, S, V = top_r_svd(w, r, method="subspace")
        rel = ((S.double() - S_ref[:, :r]).abs() / S_ref[:, :r]).max().item()
        assert rel < 1e-6, rel
        residual = torch.linalg.matrix_norm(w.double() - principal_weight(U.double(), S.double(), V.double()))
        assert (residual <= (1 + 1e-6) * optimal_residual_norm(S_ref, r)).all()
        assert orthonormality_error(U.double()).max() < 1e-5 and orthonormality_error(V.double()).max() < 1e-5


def test_subspace_iteration_is_deterministic_and_handles_rank_deficiency():
    w = spectrum_matrix(400, 300, batch=2).float()
    first, second = top_r_svd(w, 20, method="subspace"), top_r_svd(w, 20, method="subspace")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # rank 10 < r + oversample: the block holds null-space directions; the top 10 must still be exact
    low = torch.randn(2, 400, 10, dtype=torch.float64) @ torch.randn(2, 10, 300, dtype=torch.float64)
    U, S, V = top_r_svd(low, 12, method="subspace")
    S_ref = torch.linalg.svdvals(low)
    torch.testing.assert_close(S[:, :10], S_ref[:, :10], rtol=1e-10, atol=0)
    assert S[:, 10:].abs().max() < 1e-10 * S_ref[:, 0].min()
    assert orthonormality_error(V).max() < 1e-8


def test_subspace_iteration_falls_back_to_eigh_when_not_converged():
    from lit_svd.linalg import _filtered_subspace_iteration

    w = spectrum_matrix(300, 200, batch=2)
    U, S, V = _filtered_subspace_iteration(w, 16, 8, tol=0.0, max_rounds=1)  # tol 0: never "converged"
    torch.testing.assert_close(S, torch.linalg.svdvals(w)[:, :16], rtol=1e-10, atol=0)
    assert U.shape == (2, 300, 16) and V.shape == (2, 200, 16)
    assert orthonormality_error(U).max() < 1e-8


def test_top_r_svd_rejects_bad_rank_and_method():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="rank r=7"):
        top_r_svd(w, 7)
    with pytest.raises(ValueError, match="unknown svd method 'fast'"):
        top_r_svd(w, 2, method="fast")


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_thin_qr_equals_leading_part_of_full_qr(m, n):
    w = torch.randn(2, m, n, dtype=torch.float64)
    Q_full, R_full = torch.linalg.qr(w)
    Q_r, R_r = thin_qr(w, 8)
    torch.testing.assert_close(Q_r, Q_full[..., :8], rtol=0, atol=1e-12)
    torch.testing.assert_close(R_r, R_full[..., :8, :], rtol=0, atol=1e-12)


def test_residual_is_formed_in_float32_and_cast_back():
    w = torch.randn(16, 8).to(torch.bfloat16)
    delta = torch.randn(16, 8) * 1e-3
    res = residual_weight(w, delta)
    assert res.dtype == torch.bfloat16
    torch.testing.assert_close(res, (w.float() - delta).to(torch.bfloat16), rtol=0, atol=0)


def test_orthonormality_error_value():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    # XᵀX − I = diag(0, 3)
    assert orthonormality_error(X).item() == pytest.approx(3.0)


def test_low_rank_svd_and_norm_match_the_dense_product():
    P = torch.randn(2, 30, 6, dtype=torch.float64)
    Q = torch.randn(2, 20, 6, dtype=torch.float64)
    dense = P @ Q.mT
    U, S, V = low_rank_svd(P, Q)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:, :6], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(principal_weight(U, S, V), dense, rtol=1e-10, atol=1e-12)
    assert orthonormality_error(U).max() < 1e-12 and orthonormality_error(V).max() < 1e-12
    torch.testing.assert_close(low_rank_frobenius_norm(P, Q), torch.linalg.matrix_norm(dense), rtol=1e-12, atol=0)


def test_low_rank_difference_norm_is_accurate_in_float32_when_the_products_nearly_coincide():
    g = torch.Generator().manual_seed(0)
    P_0 = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    Q_0 = torch.randn(3, 25, 6, generator=g, dtype=torch.float64)
    P_1 = P_0 + 1e-4 * torch.randn(P_0.shape, generator=g, dtype=torch.float64)
    Q_1 = Q_0 + 1e-4 * torch.randn(Q_0.shape, generator=g, dtype=torch.float64)
    factors = [x.float().double() for x in (P_1, Q_1, P_0, Q_0)]  # the values float32 storage holds
    P_1, Q_1, P_0, Q_0 = factors
    dense = torch.linalg.matrix_norm(P_1 @ Q_1.mT - P_0 @ Q_0.mT)  # ~1e-4 of each product
    torch.testing.assert_close(low_rank_difference_norm(*factors), dense, rtol=1e-12, atol=0)
    result = low_rank_difference_norm(*(x.float() for x in factors))
    # expanding ‖P_1Q_1ᵀ‖² − 2⟨·,·⟩ + ‖P_0Q_0ᵀ‖² in float32 would leave no correct digit here
    torch.testing.assert_close(result.double(), dense, rtol=1e-5, atol=0)
    shared = low_rank_difference_norm(P_1, Q_0, P_0, Q_0)  # the same right factor: ΔP Q_0ᵀ
    torch.testing.assert_close(shared, torch.linalg.matrix_norm((P_1 - P_0) @ Q_0.mT), rtol=1e-12, atol=0)


def test_orthonormality_gradient_in_closed_form_equals_autograd():
    X = torch.randn(5, 40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    error, gradient = orthonormality_error_and_gradient(X)
    X_ = X.clone().requires_grad_(True)
    expected_error = orthonormality_error(X_)
    (expected_gradient,) = torch.autograd.grad(expected_error.sum(), X_)
    torch.testing.assert_close(error, expected_error.detach())
    torch.testing.assert_close(gradient, expected_gradient)
    # Exactly orthonormal: the error is 0 and so is the gradient (not NaN from dividing by it).
    identity_columns = torch.eye(40, 6, dtype=torch.float64)[None]
    error, gradient = orthonormality_error_and_gradient(identity_columns)
    assert float(error) == 0.0 and torch.count_nonzero(gradient) == 0
