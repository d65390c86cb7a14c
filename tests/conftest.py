"""Shared fixtures: tiny random models of three architectures and the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# Tolerances keyed by dtype, used by every numerical test.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2}

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_ARCHS = ("llama", "qwen2", "gpt2")
# Target names per architecture: GPT-2 uses Conv1D layers with other names.
TINY_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@pytest.fixture(autouse=True)
def _deterministic_matmuls():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)


def make_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer model with non-square projections (32 hidden, 48/64 intermediate)."""
    torch.manual_seed(seed)
    # Llama and Qwen2 share the same small shape: 32 hidden, 48 intermediate, grouped-query attention.
    decoder = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    # Random init gives near-zero weights in some layers; a wider spread makes the spectra non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    """What data-aware inits (CorDA, EVA, LoRA-GA) calibrate on in tests: 3 random batches of 2 × 12 tokens."""
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 101, (2, 12), generator=g)} for _ in range(3)]


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    from lit_svd.calibration import calibrate

    calibrate(model, calibration_batches())
    return model


def adapted(arch: str, method: str, rank: int = 4, seed: int = 0, **kwargs) -> torch.nn.Module:
    """The tiny ``arch`` model with ``method`` adapters on ``TINY_TARGETS``, initialised (calibrated first for
    data-aware inits)."""
    from lit_svd import AdapterConfig, get_adapter_class, inject_adapters

    config = AdapterConfig(method=method, rank=rank, target_modules=TINY_TARGETS[arch], **kwargs)
    model = make_tiny_model(arch, seed=seed)
    if get_adapter_class(method).calibration_statistic:
        return calibrated(inject_adapters(model, config, initialize=False))
    return inject_adapters(model, config)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    """Add seeded Gaussian noise to every trainable adapter tensor (as if trained)."""
    from lit_svd import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in layer.trainable_names:
                t = getattr(layer, name)
                t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32) from the embedded GGUF; loaded once per session."""
    from lit_svd.models import EMBEDDED_MODEL, load_causal_lm

    return load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32).eval()
