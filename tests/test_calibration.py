"""The calibration stage of data-aware inits (CorDA, EVA, LoRA-GA): maths, determinism, memory cap, errors, and fit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_TARGETS, TOLERANCE, calibration_batches, make_tiny_model
from lightning.pytorch.loggers import Logger
from lightning_helpers import RandomTokens, RandomTokensData, quiet_cpu_trainer

from lit_svd import AdapterConfig, adapter_layers, adapter_state_dict, inject_adapters
from lit_svd.attention import enable_activation_checkpointing
from lit_svd.calibration import calibrate, statistics_bytes
from lit_svd.callbacks import SVDInit
from lit_svd.data import InstructionCollator
from lit_svd.export import peft_lora_factors
from lit_svd.linalg import corda_factors, pca_components
from lit_svd.module import LitSVDAdapter

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def batches(seed: int = 7, count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 101, (2, 12), generator=g)} for _ in range(count)]


def calibrated(method: str, data=None, rank: int = 4, **kwargs):
    config = AdapterConfig(method=method, rank=rank, target_modules=TARGETS, **kwargs)
    model = inject_adapters(make_tiny_model("llama"), config, initialize=False)
    report = calibrate(model, batches() if data is None else data)
    return model, report


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items() if not k.endswith("initialized")}


# ----- linalg ---------------------------------------------------------------------------------------------------
def test_corda_ipm_and_kpm_components_add_up_to_the_weight():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X = torch.randn(40, 9, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 9, dtype=torch.float64)
    C = X.T @ X / 40
    top = corda_factors(W, C, 4, "ipm")
    bottom = corda_factors(W, C, 5, "kpm")
    parts = [U @ torch.diag(S) @ V.T for U, S, V in (top, bottom)]
    torch.testing.assert_close(parts[0] + parts[1], W, rtol=0, atol=TOLERANCE[torch.float64] * 1e3)
    assert top[1].min() >= bottom[1].max()  # IPM holds the largest components of W C, KPM the smallest
    with pytest.raises(ValueError, match="CorDA mode must be 'ipm' or 'kpm', got 'kmp'"):
        corda_factors(W, C, 4, "kmp")


def test_pca_components_are_the_right_singular_vectors_of_the_centred_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.linspace(0.1, 4, 10, dtype=torch.float64) + 5
    centred = X - X.mean(0)
    V, ratio = pca_components(centred.T @ centred / 199, 3)
    _, S, Vh = torch.linalg.svd(centred)
    torch.testing.assert_close(V.abs(), Vh[:3].T.abs(), rtol=0, atol=1e-10)
    torch.testing.assert_close(ratio, S[:3] ** 2 / (S**2).sum(), rtol=1e-12, atol=0)
    assert bool((V.gather(0, V.abs().argmax(0, keepdim=True)) > 0).all())


# ----- calibrate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"), [("corda", {}), ("corda", {"corda_mode": "kpm"}), ("eva", {}), ("loraga", {})]
)
def test_calibration_is_deterministic_and_depends_on_the_batches(method, options):
    first, report = calibrated(method, **options)
    again, _ = calibrated(method, **options)
    other, _ = calibrated(method, data=batches(seed=8), **options)
    a, b, c = state(first), state(again), state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".A"))
    assert report["calibration_batches"] == 3 and report["calibration_passes"] == 1
    stages = report["calibration_pass_seconds"] + report["calibration_finalize_seconds"]
    assert 0 < report["calibration_finalize_seconds"] and 0 < stages <= report["calibration_seconds"]
    assert all(layer.calibration is None for _, layer in adapter_layers(first))  # nothing kept after init


def test_loraga_sums_the_mean_full_weight_gradient_without_weight_gradients(monkeypatch):
    import lit_svd.calibration as calibration

    def padded(batch):  # row 1 ends in 3 padding positions: not attended to, not targets
        mask = torch.ones_like(batch["input_ids"])
        mask[1, -3:] = 0
        return {**batch, "attention_mask": mask, "labels": batch["input_ids"].masked_fill(mask == 0, -100)}

    data = [padded(b) for b in batches()]
    # Reference: autograd's dL/dW of each target weight (padding rows of x included), averaged over the batches.
    reference = make_tiny_model("llama")
    reference.requires_grad_(False)
    weights = {n: m.weight for n, m in reference.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    for w in weights.values():
        w.requires_grad_(True)
    for b in data:
        reference(**b).loss.backward()
    seen = []
    factors = calibration.loraga_factors

    def capture(G, r, dtype=None):  # called once per batch of same-shape gradients
        seen.extend(G.reshape(-1, *G.shape[-2:]).clone())
        return factors(G, r, dtype=dtype)

    monkeypatch.setattr(calibration, "loraga_factors", capture)
    model, _ = calibrated("loraga", data=data)
    assert len(seen) == len(weights)
    for name, layer in adapter_layers(model):
        expected = weights[name].grad / len(data)
        match = [G for G in seen if G.shape == expected.shape and torch.allclose(G, expected, rtol=1e-4, atol=1e-6)]
        assert len(match) == 1, name  # each layer's own mean gradient, no other layer's
        assert layer.base_layer.weight.grad is None and layer.A.grad is None and layer.B.grad is None
        # A = V_{:r}ᵀ: orthonormal rows; B = U_{r:2r} diag(S_{r:2r}) · m^{1/4}/√16
        torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(4), rtol=0, atol=1e-5)
        S = torch.linalg.svdvals(match[0].double())[4:8] * layer.out_features**0.25 / 4
        torch.testing.assert_close(layer.B.norm(dim=0).double(), S, rtol=1e-4, atol=0)
    # Without labels the default forward predicts the input ids, padding excluded: the same statistic.
    unlabelled, _ = calibrated("loraga", data=[{k: v for k, v in b.items() if k != "labels"} for b in data])
    assert all(torch.equal(v, state(unlabelled)[k]) for k, v in state(model).items())


def test_memory_cap_splits_the_layers_into_passes_with_the_same_result():
    whole, one = calibrated("corda")
    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="corda", rank=4, target_modules=TARGETS), initialize=False
    )
    per_layer = [statistics_bytes(layer) for _, layer in adapter_layers(model)]
    assert per_layer[:4] == [4 * (32 * 32 + 32)] * 3 + [4 * (48 * 48 + 48)]
    split = calibrate(model, batches(), max_statistics_bytes=2 * per_layer[0])
    # Per decoder layer: [q, v], [gate] (q, v, gate would exceed the cap), [down] (alone above the cap).
    assert split["calibration_passes"] == 6 and split["calibration_peak_bytes"] == per_layer[3]
    # Unsplit, q and v of each decoder layer read one input and share one statistic.
    assert one["calibration_peak_bytes"] == sum(per_layer) - 2 * per_layer[0]
    assert one["calibration_shared_layers"] == 2 and split["calibration_shared_layers"] == 2
    a, b = state(whole), state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_shows_progress_per_pass_when_asked(capsys):
    calibrated("corda")
    assert "Calibrating" not in capsys.readouterr().err  # off by default
    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="loraga", rank=4, target_modules=TARGETS), initialize=False
    )
    calibrate(model, batches(), progress=True, max_statistics_bytes=statistics_bytes(next(adapter_layers(model))[1]))
    bars = capsys.readouterr().err
    passes = len(TARGETS) * 2  # one layer per group under this cap
    for number in (1, passes):
        assert f"Calibrating loraga (layer group {number}/{passes}): 100%" in bars and "3/3" in bars


@pytest.mark.parametrize("method", ["corda", "eva"])
def test_layers_reading_one_input_share_a_statistic_equal_to_their_own(method):
    import lit_svd.calibration as calibration

    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method=method, rank=4, target_modules=TARGETS), initialize=False
    )
    layers = [layer for _, layer in adapter_layers(model)]
    data = [{**b, "attention_mask": (torch.rand(b["input_ids"].shape) > 0.2).long()} for b in batches()]
    data[0]["attention_mask"][1] = 0  # a sequence with no real token
    run = calibration._default_forward(model)
    collectors = {}
    for share in (True, False):
        collectors[share] = calibration._Collector(layers, share)
        handles = [collectors[share].register(layer) for layer in layers]
        with calibration._base_model_only(model):
            for batch in data:
                collectors[share].start_batch(*calibration._statistic_tokens(batch))
                run(batch)
                collectors[share].end_batch()
        for handle in handles:
            handle.remove()
    shared, separate = collectors[True].sums, collectors[False].sums
    assert [shared[layer].layers[0].layer_name.rsplit(".", 1)[-1] for layer in layers[:4]] == [
        "q_proj",
        "q_proj",  # v_proj reads q_proj's input
        "gate_proj",
        "down_proj",
    ]
    for layer in layers:  # the same GEMMs on the same tokens: bitwise equal
        for mine, own in zip(shared[layer].tensors(), separate[layer].tensors(), strict=True):
            assert torch.equal(mine, own), layer.layer_name


class Twins(torch.nn.Module):
    """Two linear layers that read one tensor on the first batch only (``same_first``), equal values after it."""

    def __init__(self, same_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.a, self.b = torch.nn.Embedding(101, 16), torch.nn.Linear(16, 12), torch.nn.Linear(16, 12)
        self.same_first, self.calls = same_first, 0

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed(input_ids)
        y = x if self.same_first and self.calls == 0 else x.clone()
        y = y if self.calls == 0 else y * 2  # later batches: b reads other values than a
        self.calls += 1
        return self.a(x) + self.b(y)


def test_inputs_that_stop_being_shared_are_summed_again_each_layer_on_its_own():
    results = {}
    for same_first in (True, False):
        model = inject_adapters(
            Twins(same_first), AdapterConfig(method="corda", rank=4, target_modules=["a", "b"]), False
        )
        report = calibrate(model, batches())
        results[same_first] = (state(model), report["calibration_passes"])
    assert results[True][1] == 2 and results[False][1] == 1  # sharing broke on the second batch: one more pass
    assert all(torch.equal(v, results[False][0][k]) for k, v in results[True][0].items())


def test_batched_finalize_equals_each_matrix_on_its_own():
    from lit_svd.linalg import damped_inverse, loraga_factors

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 400, 300, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 300, dtype=torch.float64)
    C = X.mT @ X / 400
    W = torch.randn(3, 200, 300, generator=g, dtype=torch.float64)
    # Batched = per matrix, in float64 (tolerance: LAPACK's batched and single calls agree to rounding).
    damped = damped_inverse(C)
    for i in range(3):
        one = damped_inverse(C[i])
        torch.testing.assert_close((damped[0][i], damped[1][i]), one, rtol=0, atol=1e-12)
    for mode in ("ipm", "kpm"):
        batched = corda_factors(W, C, 8, mode)
        for i in range(3):
            for mine, own in zip(batched, corda_factors(W[i], C[i], 8, mode), strict=True):
                torch.testing.assert_close(mine[i].abs(), own.abs(), rtol=0, atol=1e-8)
    A, B = loraga_factors(W, 4)
    for i in range(3):
        A_i, B_i = loraga_factors(W[i], 4)
        torch.testing.assert_close(B[i] @ A[i], B_i @ A_i, rtol=0, atol=1e-9)  # signs cancel in the product
    # The top-k eigenpairs by subspace iteration (the GPU path) against the full eigendecomposition.
    V_full, ratio_full = pca_components(C, 12, method="eigh")
    V_top, ratio_top = pca_components(C, 12, method="subspace")
    torch.testing.assert_close(ratio_top, ratio_full, rtol=1e-9, atol=0)
    torch.testing.assert_close(V_top, V_full, rtol=0, atol=1e-6)  # same signs: the largest entry is positive


def test_calibration_reads_only_real_tokens():
    # Padding (attention_mask 0) never enters the statistics: padded and trimmed batches give the same init.
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (1, 60), generator=g)  # more tokens than inputs: a well-posed C
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1)}
    padded["attention_mask"] = torch.cat([torch.ones(1, 60), torch.zeros(1, 4)], 1).long()
    for method in ("corda", "eva"):
        a, _ = calibrated(method, data=[{"input_ids": ids}])
        b, _ = calibrated(method, data=[padded])
        c, _ = calibrated(method, data=[{"input_ids": padded["input_ids"]}])  # the padding read as tokens
        sa, sb, sc = state(a), state(b), state(c)
        # float32 attention over a masked tail rounds differently; reading the 4 padding tokens moves far more.
        assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4
        assert max((sa[k] - sc[k]).abs().max().item() for k in sa) > 1e-2


def instruction_batches(pack: bool = False, multiple: int | None = None) -> list[dict]:
    """12 prompt + response examples of 6–19 tokens in 3 batches: right-padded, or packed by the collator."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(6, 20, (12,), generator=g).tolist()
    examples = [
        {"input_ids": torch.randint(1, 101, (n,), generator=g).tolist(), "prompt_length": n // 3} for n in lengths
    ]
    collate = InstructionCollator(pad_token_id=0, pack=pack, pack_to_multiple_of=multiple)
    return [collate(examples[i : i + 4]) for i in range(0, 12, 4)]


@pytest.mark.parametrize("method", ["corda", "eva", "loraga"])
def test_packed_batches_give_the_statistics_of_the_padded_ones(method):
    # Padded batches run as given, packed by calibrate (the default), and packed by the collator with a
    # trailing padding sequence: the same tokens, so the same init. A packed row holds several sequences, so
    # CorDA's per-sequence scaling must follow cu_seq_lens, and the padding sequence is no input.
    runs = {
        "padded": (instruction_batches(), False),
        "packed here": (instruction_batches(), None),
        "packed by the collator": (instruction_batches(pack=True, multiple=32), None),
    }
    states, reports = {}, {}
    for name, (data, pack) in runs.items():
        config = AdapterConfig(method=method, rank=4, target_modules=TARGETS)
        model = inject_adapters(make_tiny_model("llama"), config, initialize=False)
        reports[name] = calibrate(model, data, pack_batches=pack)
        states[name] = state(model)
    assert [reports[name]["calibration_packed"] for name in runs] == [False, True, True]
    for name in ("packed here", "packed by the collator"):
        for key, expected in states["padded"].items():
            torch.testing.assert_close(states[name][key], expected, rtol=0, atol=2e-5, msg=f"{name}: {key}")


def test_packing_needs_a_model_with_the_attention_interface():
    model = inject_adapters(
        Twins(same_first=True), AdapterConfig(method="corda", rank=2, target_modules=["a"]), initialize=False
    )
    with pytest.raises(ValueError, match="pack_batches=True, but Twins does not dispatch attention"):
        calibrate(model, batches(), pack_batches=True)


@pytest.mark.parametrize("method", ["corda", "eva"])
def test_bf16_inputs_are_summed_to_float32_accuracy(method, monkeypatch):
    # A bf16 model's inputs go to bf16 GEMMs with float32 sums on GPUs; CorDA's x/p² as three bf16 parts. Both
    # must give the float32 statistic of the same (bf16) values, not a bf16-rounded one. The CPU takes that
    # path here (its GEMMs multiply float32 copies of the parts, so the split is what is tested).
    import lit_svd.calibration as calibration

    monkeypatch.setattr(calibration, "_tensor_core_sums", lambda rows: rows.dtype == torch.bfloat16)

    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method=method, rank=4, target_modules=["gate_proj"]), initialize=False
    )
    layer = next(layer for _, layer in adapter_layers(model))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 10, 32, generator=g) * torch.logspace(-2, 1, 32)).to(torch.bfloat16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False  # padding
    sequence = torch.arange(3)[:, None].expand(3, 10)
    sums = {}
    for dtype in (torch.bfloat16, torch.float32):
        sums[dtype] = calibration._Sums(layer)
        sums[dtype].add_inputs(x.to(dtype), calibration._Tokens(mask, sequence, 3))
    rows = [x[i][mask[i]].double() for i in range(3)]
    if method == "corda":  # each sequence scaled by its |max|
        rows = [r / r.max().abs() for r in rows]
    reference = sum(r.T @ r for r in rows)
    for dtype, got in sums.items():
        scale = reference.abs().max().item()
        torch.testing.assert_close(got.outer.double(), reference, rtol=2e-6, atol=2e-6 * scale, msg=str(dtype))
    if method == "corda":  # x/p² rounded to bf16 once would be far off: the split is what keeps the accuracy
        rounded = sum(r.T @ r.to(torch.bfloat16).double() for r in rows)
        error = (sums[torch.bfloat16].outer.double() - reference).abs().max()
        assert (rounded - reference).abs().max() > 100 * error


def test_eva_redistribution_keeps_the_budget_and_zero_rows_never_train():
    model, report = calibrated("eva", eva_rho=2.0)
    ranks = report["eva_ranks"]
    layers = dict(adapter_layers(model))
    assert sum(ranks.values()) == 4 * len(layers) and max(ranks.values()) <= 8 and len(set(ranks.values())) > 1
    for name, layer in layers.items():
        assert layer.A.shape[0] == 8 and layer.scaling == 1.0  # round(ρ r) rows stored, scale alpha / r
        k = ranks[name]
        assert torch.equal(layer.A[k:], torch.zeros_like(layer.A[k:])) and bool((layer.A[:k].norm(dim=1) > 0.99).all())
    # The rows a layer was not given stay exactly zero through training (their gradients are zero).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = batches(seed=11)[0]["input_ids"]
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in layers.items():
        k = ranks[name]
        assert torch.equal(layer.A[k:], torch.zeros_like(layer.A[k:])), name
        assert torch.equal(layer.B[:, k:], torch.zeros_like(layer.B[:, k:])), name
        assert layer.B[:, :k].abs().max() > 0


def test_export_ranks_corda_and_loraga_2r_eva_r():
    name = "model.layers.0.self_attn.q_proj"
    for method, rank in (("corda", 8), ("loraga", 8), ("eva", 4)):  # moved W: 2r against W; W unchanged: r
        model, _ = calibrated(method)
        assert peft_lora_factors(dict(adapter_layers(model))[name])[0].shape[0] == rank, method


# ----- errors ---------------------------------------------------------------------------------------------------
def test_data_aware_methods_refuse_to_initialise_without_calibration():
    for method in ("corda", "eva"):
        with pytest.raises(ValueError, match=rf"{method} is a data-aware init and 8 layer\(s\) have no calibration"):
            inject_adapters(make_tiny_model("llama"), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="corda", rank=4, target_modules=TARGETS), initialize=False
    )
    with pytest.raises(ValueError, match="calibration of corda got 0 batches"):
        calibrate(model, [])
    with pytest.raises(
        ValueError,
        match=r"loraga takes 2·rank = 18 .* layer\(s\) 'model.layers.0.self_attn.v_proj' \(16×32\), 'model.layers.1",
    ):
        calibrated("loraga", rank=9)
    padding_only = [{"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.zeros(1, 5)}]
    with pytest.raises(ValueError, match="calibration saw no tokens for layer 'model.layers.0.self_attn.q_proj'"):
        calibrate(model, padding_only)
    assert all(layer.calibration is None and not bool(layer.initialized) for _, layer in adapter_layers(model))


def test_bad_options_are_reported_together():
    with pytest.raises(ValueError, match="calibration_batches must be a positive integer, got 0; max_calibration"):
        SVDInit(calibration_batches=0, max_calibration_bytes=-1)
    with pytest.raises(ValueError, match="corda_mode must be 'ipm' or 'kpm'.*\n.*eva_rho must be >= 1"):
        AdapterConfig(method="eva", corda_mode="both", eva_rho=0.5)


# ----- inside fit -----------------------------------------------------------------------------------------------
class Metrics(Logger):
    name, version = "metrics", 0
    experiment = None

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.logged |= metrics

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class InitState(SVDInit):
    """SVDInit that keeps a copy of the adapters right after init."""

    def initialize(self, trainer, pl_module, device=None) -> None:
        super().initialize(trainer, pl_module, device)
        self.after_init = state(pl_module.model)


@pytest.mark.parametrize("method", ["corda", "eva", "loraga"])
def test_fit_calibrates_on_the_first_train_batches_and_logs_its_cost(method, tmp_path):
    config = AdapterConfig(method=method, rank=4, target_modules=TARGETS)
    base = make_tiny_model("llama")
    module = LitSVDAdapter(copy.deepcopy(base), config, learning_rate=1e-2)
    svd_init, logger = InitState(calibration_batches=2), Metrics()
    trainer = quiet_cpu_trainer(tmp_path, max_steps=1, callbacks=[svd_init], logger=logger, limit_val_batches=0)
    trainer.fit(module, datamodule=RandomTokensData(count=16, batch_size=4))
    assert logger.logged["init/calibration_s"] > 0 and svd_init.report["calibration_batches"] == 2
    stages = logger.logged["init/calibration_pass_s"] + logger.logged["init/calibration_finalize_s"]
    assert 0 < stages <= logger.logged["init/calibration_s"]
    # The same init as calibrating by hand on the loader's first two batches (labels mask EVA's tokens).
    loader = RandomTokensData(count=16, batch_size=4).train_dataloader()
    reference = inject_adapters(copy.deepcopy(base), config, initialize=False)
    calibrate(reference, [b for _, b in zip(range(2), loader, strict=False)])
    expected = state(reference)
    for key, value in svd_init.after_init.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5)
    assert all(p.grad is None for p in module.model.parameters() if not p.requires_grad)


def test_resume_and_already_initialised_adapters_skip_calibration(tmp_path):
    config = AdapterConfig(method="corda", rank=4, target_modules=TARGETS)
    module = LitSVDAdapter(make_tiny_model("llama"), config, learning_rate=1e-9)
    calibrate(module.model, batches())  # as a restored checkpoint would leave them: initialised
    before = state(module.model)

    class NoData(RandomTokensData):
        def train_dataloader(self):
            loader = super().train_dataloader()
            self.calls = getattr(self, "calls", 0) + 1
            return loader

    data, svd_init = NoData(count=8), SVDInit(calibration_batches=2)
    trainer = quiet_cpu_trainer(tmp_path, max_steps=1, callbacks=[svd_init], limit_val_batches=0, max_epochs=1)
    trainer.fit(module, datamodule=data)
    assert svd_init.report is None and data.calls == 1  # only the fit loop asked for the loader
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in state(module.model).items())


class Shuffled(RandomTokensData):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(RandomTokens(16), batch_size=4, shuffle=True)


class RecordBatches(LitSVDAdapter):
    def training_step(self, batch, batch_idx):
        self.seen = [*getattr(self, "seen", []), batch["input_ids"][:, 3].tolist()]
        return super().training_step(batch, batch_idx)


def test_calibration_does_not_change_the_training_batch_order(tmp_path):
    # A shuffled loader draws its seed from the global RNG; calibration must not consume it.
    orders = []
    for method in ("pissa", "eva"):
        torch.manual_seed(0)
        module = RecordBatches(make_tiny_model("llama"), AdapterConfig(method=method, rank=4, target_modules=TARGETS))
        trainer = quiet_cpu_trainer(tmp_path, max_steps=2, callbacks=[SVDInit(calibration_batches=2)])
        trainer.fit(module, datamodule=Shuffled())
        orders.append(module.seen)
    assert orders[0] == orders[1] and len(orders[0]) == 2


@pytest.mark.parametrize("method", ["loraga", "corda"])
def test_gradient_checkpointing_does_not_change_the_calibration(method):
    """Checkpointing re-runs each layer's forward in backward; statistics counted per forward would be counted
    twice. Calibration runs the model in eval mode, where transformers does not checkpoint: same factors."""
    states = []
    for checkpointing in (False, True):
        model = make_tiny_model("llama")
        if checkpointing:
            enable_activation_checkpointing(model, {"use_reentrant": False})
        model.train()
        config = AdapterConfig(method=method, rank=4, target_modules=TINY_TARGETS["llama"])
        calibrate(inject_adapters(model, config, initialize=False), calibration_batches())
        states.append(adapter_state_dict(model))
        assert model.training  # calibration leaves the mode as it found it
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
