"""Why the Gram path loses accuracy on the GPU, and the cost of the fix: a diagnostic for bench/init.py.

On an H100, ``top_r_svd(method="gram")`` reached ~3e-5 relative singular-value error on SmolLM2 where the
CPU gives ~1e-6. Hypothesis: the float32 eigenvectors from cuSOLVER's syevd are orthonormal only to
~n·eps, and the Rayleigh–Ritz step treats the basis as exactly orthonormal, so its error enters the
singular values at first order. Fix tested here: re-orthonormalise the (n, k) basis in float64 by
Cholesky-QR (``B ← B L⁻ᵀ`` with ``L Lᵀ = BᵀB``; cheap, and exact because ``BᵀB ≈ I`` is well
conditioned) before the Rayleigh–Ritz step. Also compares ``torch.linalg.svd`` drivers for "full".

Usage:
    PYTHONPATH=. python bench/orthogonality.py --real-weights smol.safetensors [--out results/orthogonality.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, Timer, environment, format_table, write_json
from safetensors.torch import load_file

from lit_svd.linalg import top_r_svd


def gram_basis(w: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k Gram eigenvectors (..., n, k) in float32, as lit_svd's gram path computes them (m >= n)."""
    return torch.linalg.eigh(w.mT @ w)[1][..., -k:]


def cholqr64(B: torch.Tensor) -> torch.Tensor:
    """Float64 Cholesky-QR re-orthonormalisation of the columns of ``B`` (..., n, k)."""
    B = B.double()
    L = torch.linalg.cholesky(B.mT @ B)
    return torch.linalg.solve_triangular(L, B.mT, upper=False).mT


def ritz_values(w: torch.Tensor, B: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svdvals(w.double() @ B.double())[..., :r]


def orth_error(B: torch.Tensor) -> float:
    B = B.double()
    return torch.linalg.matrix_norm(B.mT @ B - torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)).max().item()


def rel_err(S: torch.Tensor, ref: torch.Tensor) -> float:
    r = S.shape[-1]
    return ((S.double().cpu() - ref[..., :r]).abs() / ref[..., :r]).max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-weights", required=True, help="safetensors of SmolLM2 matrices (bench/init.py dump)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--big", type=int, default=4096, help="size of the random bf16 square matrices (0: skip)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "orthogonality.json")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict[str, Any] = {"meta": environment(device), "real": [], "big": []}

    weights = load_file(args.real_weights)
    for r in args.ranks:
        for name, W in weights.items():
            ref = torch.linalg.svdvals(W.double())
            w = W.to(device)
            wt = w.mT if w.shape[0] < w.shape[1] else w  # the Gram of the smaller side, as lit_svd does
            k = min(wt.shape[-1], r + max(8, r // 4))
            B = gram_basis(wt, k)
            B_cpu = gram_basis(wt.cpu(), k)
            results["real"].append(
                {
                    "matrix": name,
                    "rank": r,
                    "n": wt.shape[-1],
                    "orth_err_eigh_device": orth_error(B),
                    "orth_err_eigh_cpu": orth_error(B_cpu),
                    "sv_err_lit_svd_gram": rel_err(top_r_svd(w, r, method="gram")[1], ref),
                    "sv_err_gram_cholqr64": rel_err(ritz_values(wt, cholqr64(B), r), ref),
                    "sv_err_full_default": rel_err(torch.linalg.svdvals(w)[:r], ref),
                    "sv_err_full_gesvd": rel_err(torch.linalg.svd(w, driver="gesvd")[1][:r], ref)
                    if device.type == "cuda"
                    else None,
                }
            )
    write_json(args.out, results)
    cols = list(results["real"][0])
    fmt = {c: "{:.1e}".format for c in cols if c.startswith(("orth", "sv_"))}
    print(format_table(results["real"], cols, fmt), flush=True)

    if args.big:
        torch.manual_seed(3)
        n, r = args.big, 128
        k = r + max(8, r // 4)
        w = (0.02 * torch.randn(8, n, n, device=device)).to(torch.bfloat16).float()
        B = gram_basis(w, k)
        with Timer(device) as t:
            Bo = cholqr64(B)
        ref = torch.linalg.svdvals(w[0].double()).cpu()  # float64 on the device: the CPU is too slow here
        results["big"].append(
            {
                "shape": f"8x{n}x{n} bf16 random",
                "orth_err_eigh_device_max": orth_error(B),
                "cholqr64_seconds_for_8": t.seconds,
                "sv_err_lit_svd_gram[0]": rel_err(top_r_svd(w[:1], r, method="gram")[1][0], ref),
                "sv_err_gram_cholqr64[0]": rel_err(ritz_values(w[0], Bo[0], r), ref),
            }
        )
        write_json(args.out, results)
        print(results["big"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
