"""Which 4-bit NF4 library backs ``base_quantization="nf4"``: bitsandbytes vs torchao's ``NF4Tensor``, on the CPU.

Measured on SmolLM2-135M-Instruct's real weights (the 210 projections of its 30 decoder layers):
- which weights each library quantizes at its defaults (torchao needs numel / 64 divisible by its scaler
  block of 256; here a fallback block gcd(numel / 64, 256) is used for the error numbers);
- the relative quantization error ‖W − deq(Q(W))‖_F / ‖W‖_F over all projections;
- quantize and dequantize time, and forward + backward time of the 4-bit linear layer at 2,048 tokens, on one
  576×1536 down_proj (2 CPU threads);
- bytes per weight including scales;
- import time in a fresh interpreter.

Needs both libraries installed (``pip install --no-deps torchao bitsandbytes``); torchao is not a lit_svd
dependency. Usage: ``PYTHONPATH=. python bench/quantization_libraries.py`` → bench/results/quantization_libraries.json.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import torch
from _common import RESULTS_DIR, environment, write_json


def _import_seconds(statement: str) -> float:
    code = f"import time, torch; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _ms(fn, reps: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    torch.set_num_threads(2)
    imports = {
        "bitsandbytes": _import_seconds("import bitsandbytes.functional"),
        "torchao": _import_seconds("from torchao.quantization import to_nf4"),
    }
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    from torchao.quantization import to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    from lit_svd.models import EMBEDDED_MODEL, load_causal_lm

    model = load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32)
    weights = {
        n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }

    def torchao_nf4(w: torch.Tensor):
        return to_nf4(w, 64, math.gcd(w.numel() // 64, 256))

    refused = []
    squared = {"bitsandbytes": 0.0, "bitsandbytes_double": 0.0, "torchao": 0.0}
    total = 0.0
    for name, w in weights.items():
        total += w.norm().item() ** 2
        for key, double in (("bitsandbytes", False), ("bitsandbytes_double", True)):
            q, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
            squared[key] += (BF.dequantize_4bit(q, state) - w).norm().item() ** 2
        try:
            to_nf4(w)
        except AssertionError:
            refused.append(name)
        squared["torchao"] += (torchao_nf4(w).get_original_weight() - w).norm().item() ** 2

    w = weights["model.layers.0.mlp.down_proj"]  # 576 × 1536
    x = torch.randn(2048, w.shape[1], requires_grad=True)
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4 = to_nf4(w)

    def forward_backward(fn):
        def run():
            fn().sum().backward()
            x.grad = None

        return run

    inner = ("quantized_scalers", "quantization_factor", "quantized_data", "scaler_mean", "nf4")
    bnb_bytes = q.numel() + sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values())
    result = {
        "environment": environment(torch.device("cpu")),
        "versions": {"bitsandbytes": bnb.__version__, "torchao": __import__("torchao").__version__},
        "import_seconds": imports,
        "projections": len(weights),
        "torchao_default_refuses": {"count": len(refused), "modules": sorted({n.rsplit(".", 1)[1] for n in refused})},
        "relative_error": {k: math.sqrt(v / total) for k, v in squared.items()},
        "down_proj_576x1536_ms": {
            "quantize": {
                "bitsandbytes_double": _ms(
                    lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                ),
                "torchao": _ms(lambda: to_nf4(w)),
            },
            "dequantize": {
                "bitsandbytes_double": _ms(lambda: BF.dequantize_4bit(q, state)),
                "torchao": _ms(lambda: nf4.get_original_weight()),
            },
            "linear_forward_backward_2048_tokens": {
                "float32": _ms(forward_backward(lambda: torch.nn.functional.linear(x, w))),
                "bitsandbytes_double": _ms(forward_backward(lambda: bnb.matmul_4bit(x, q.t(), quant_state=state))),
                "torchao": _ms(forward_backward(lambda: linear_nf4(x, nf4))),
            },
        },
        "bytes_per_weight": {
            "float32": 4.0,
            "bitsandbytes_double": bnb_bytes / w.numel(),
            "torchao": sum(getattr(nf4, a).numel() * getattr(nf4, a).element_size() for a in inner) / w.numel(),
        },
    }
    write_json(RESULTS_DIR / "quantization_libraries.json", result)
    print({k: v for k, v in result.items() if k != "environment"})


if __name__ == "__main__":
    main()
