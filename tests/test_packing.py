"""The fast training path: fused head + cross-entropy on labelled rows, padding-free packed batches."""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARCHS, TINY_TARGETS, make_tiny_model
from lightning_helpers import quiet_cpu_trainer
from torch._dynamo import list_backends, register_backend
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lit_svd import AdapterConfig
from lit_svd.attention import VARLEN_ATTENTION, packed_attention, packed_causal_attention, sequence_boundaries
from lit_svd.data import GSM8KDataModule, InstructionCollator, non_padding_tokens, pack_padded_batch
from lit_svd.inject import adapter_layers, adapter_state_dict, initialize_adapters, inject_adapters
from lit_svd.losses import causal_lm_batch_loss, causal_lm_loss, linear_cross_entropy
from lit_svd.module import LitSVDAdapter, decoder_layers


# ----- fused linear cross-entropy -----------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_unfused_value_and_gradients(chunk_rows, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 13, (10,))
    fused = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=chunk_rows)
    (3.0 * fused).backward()  # a non-unit upstream gradient must scale the stored gradients
    fused_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    (3.0 * reference).backward()
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, t in zip(fused_grads, [t for t in (hidden, weight, bias) if t is not None], strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-6, atol=1e-9)


def test_linear_cross_entropy_frozen_head_gets_no_gradient_and_empty_input_is_zero():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(13, 8)  # frozen
    linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3])).backward()
    assert weight.grad is None and hidden.grad.abs().sum() > 0
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = linear_cross_entropy(empty, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 8)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_reference():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(200, 32)
    targets = torch.randint(0, 200, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-3)


def test_linear_cross_entropy_names_bad_shapes():
    with pytest.raises(ValueError, match=r"agree on H.*\(4, 8\).*\(13, 7\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(13, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(13, 8), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_causal_lm_loss_equals_hugging_face_loss(arch):
    model = make_tiny_model(arch)
    input_ids = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    got = causal_lm_loss(hidden, model.get_output_embeddings(), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_causal_lm_loss_by_scored_positions_equals_the_masked_loss():
    head = torch.nn.Linear(8, 37, bias=True, dtype=torch.float64)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 37, (2, 9))
    labels[0, :3] = labels[1, :6] = labels[1, 8] = -100
    positions = torch.nonzero((labels[:, 1:] != -100).reshape(-1)).squeeze(1)  # flat (B, T − 1) indices
    losses, grads = [], []
    for scored_positions in (None, positions):
        loss = causal_lm_loss(hidden, head, labels, chunk_rows=3, scored_positions=scored_positions)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, (hidden, head.weight, head.bias)))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


# ----- packed attention -------------------------------------------------------------------------------
def block_causal_reference(query, key, value, lengths):
    """Dense sdpa over the whole row with a block-diagonal causal mask: (N, H, D) in and out."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = len(ids)
    mask = (ids[:, None] == ids[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),
        key.transpose(0, 1),
        value.transpose(0, 1),
        attn_mask=mask,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_packed_attention_equals_block_diagonal_causal_attention(kv_heads):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    query = torch.randn(total, 4, 8, dtype=torch.float64)
    key = torch.randn(total, kv_heads, 8, dtype=torch.float64)
    value = torch.randn(total, kv_heads, 8, dtype=torch.float64)
    got = packed_causal_attention(query, key, value, sequence_boundaries(lengths), max(lengths))
    torch.testing.assert_close(got, block_causal_reference(query, key, value, lengths))
    # Compiled (a traced layer cannot read the boundaries on the host): the same numbers, in one graph.
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(packed_causal_attention, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(query, key, value, sequence_boundaries(lengths), max(lengths)), got)
    assert counters["stats"]["unique_graphs"] == 1


def test_packed_attention_rejects_inconsistent_boundaries():
    query = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="cu_seq_lens ends at 5 but the packed row has 6 tokens"):
        packed_causal_attention(query, query, query, sequence_boundaries([2, 3]), 3)
    with pytest.raises(ValueError, match="at least one token"):
        sequence_boundaries([2, 0])


# ----- collator -----------------------------------------------------------------------------------------
def test_packing_collator_layout():
    examples = [
        {"input_ids": [11, 12, 13, 14], "prompt_length": 2},
        {"input_ids": [21, 22, 23], "prompt_length": 1},
        {"input_ids": [31, 32], "prompt_length": 0},  # no prompt: the first token still has no predecessor
    ]
    batch = InstructionCollator(pad_token_id=0, pack=True)(examples)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23, -100, 32]]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 7, 9] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 4 and batch["padding_tokens"] == 0 and "attention_mask" not in batch
    assert batch["scored_positions"].tolist() == [1, 2, 4, 5, 7]  # positions whose next token has a label
    with pytest.raises(ValueError, match="pack=True is for training batches"):
        InstructionCollator(pad_token_id=0, pack=True, generation_inputs=True)


@pytest.mark.parametrize("multiple, padding", [(4, 3), (3, 3), (16, 7)])
def test_packing_collator_pads_rows_to_a_multiple_with_a_padding_sequence(multiple, padding):
    examples = [
        {"input_ids": [11, 12, 13, 14], "prompt_length": 2},
        {"input_ids": [21, 22, 23], "prompt_length": 1},
        {"input_ids": [31, 32], "prompt_length": 0},
    ]
    batch = InstructionCollator(pad_token_id=0, max_length=8, pack=True, pack_to_multiple_of=multiple)(examples)
    # 9 tokens: always at least one padding token, so every row has the same number of sequences
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 31, 32] + [0] * padding]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23, -100, 32] + [-100] * padding]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, *range(padding)]]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 7, 9, 9 + padding]
    # an upper bound that does not depend on the batch: the truncation length or the multiple
    assert batch["max_length"] == max(8, multiple)
    assert batch["padding_tokens"] == padding


def test_non_padding_tokens_of_padded_packed_and_rounded_up_batches():
    lengths = [len(e["input_ids"]) for e in EXAMPLES]  # 9, 5, 14, 7
    padded = InstructionCollator(pad_token_id=0)(EXAMPLES)
    packed = InstructionCollator(pad_token_id=0, pack=True)(EXAMPLES)
    rounded = InstructionCollator(pad_token_id=0, pack=True, pack_to_multiple_of=16)(EXAMPLES)
    assert padded["input_ids"].numel() == 4 * 14 and rounded["input_ids"].numel() == 48
    assert int(non_padding_tokens(padded)) == non_padding_tokens(packed) == non_padding_tokens(rounded) == sum(lengths)


def test_packing_a_padded_batch_gives_the_collators_packed_row_and_the_same_loss():
    # Two routes to one packed row: the collator packs token lists, pack_padded_batch packs a padded batch.
    padded = InstructionCollator(pad_token_id=0)(EXAMPLES)
    collated = InstructionCollator(pad_token_id=0, pack=True)(EXAMPLES)
    packed = pack_padded_batch(padded)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens", "max_length", "padding_tokens"):
        got, expected = packed[key], collated[key]
        assert torch.equal(got, expected) if isinstance(got, torch.Tensor) else got == expected, key
    model = make_tiny_model("llama").eval()
    torch.testing.assert_close(
        causal_lm_batch_loss(model, packed), causal_lm_batch_loss(model, padded), rtol=1e-5, atol=0
    )
    # An empty row is dropped; without labels every real token after its sequence's first is a target.
    ids = torch.tensor([[5, 6, 7], [0, 0, 0], [8, 9, 0]])
    bare = pack_padded_batch({"input_ids": ids, "attention_mask": (ids > 0).long()})
    assert bare["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and bare["cu_seq_lens"].tolist() == [0, 3, 5]
    assert bare["labels"].tolist() == [[-100, 6, 7, -100, 9]] and bare["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="without a single real token"):
        pack_padded_batch({"input_ids": ids[1:2], "attention_mask": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match=r"input_ids of shape \(batch, sequence\), got \(3,\)"):
        pack_padded_batch({"input_ids": ids[0]})


def test_pack_to_multiple_of_needs_packing_and_a_positive_size():
    with pytest.raises(ValueError, match="pack_to_multiple_of needs pack=True"):
        InstructionCollator(pad_token_id=0, pack_to_multiple_of=64)
    with pytest.raises(ValueError, match="pack_to_multiple_of must be a positive integer, got 0"):
        InstructionCollator(pad_token_id=0, pack=True, pack_to_multiple_of=0)
    with pytest.raises(ValueError, match="pack_to_multiple_of needs pack_sequences=True"):
        GSM8KDataModule(pack_to_multiple_of=64)


# ----- the module: packed == padded ------------------------------------------------------------------------
EXAMPLES = [
    {
        "input_ids": torch.randint(0, 101, (length,), generator=torch.Generator().manual_seed(length)).tolist(),
        "prompt_length": prompt,
    }
    for length, prompt in [(9, 3), (5, 2), (14, 6), (7, 1)]
]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["lora", "sorsa"])
def test_packed_loss_and_gradients_equal_padded(arch, method):
    module = LitSVDAdapter(
        make_tiny_model(arch), AdapterConfig(method=method, rank=4, target_modules=TINY_TARGETS[arch])
    )
    initialize_adapters(module.model)  # eval mode: GPT-2's dropout would make the two passes differ
    padded = InstructionCollator(pad_token_id=0)(EXAMPLES)
    packed = InstructionCollator(pad_token_id=0, pack=True)(EXAMPLES)
    trainable = [p for p in module.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        loss = module.compute_loss(batch)
        return loss.detach(), torch.autograd.grad(loss, trainable)

    padded_loss, padded_grads = loss_and_grads(padded)
    packed_loss, packed_grads = loss_and_grads(packed)
    reference = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference_loss = F.cross_entropy(reference[:, :-1].reshape(-1, 101), padded["labels"][:, 1:].reshape(-1))
    assert padded_loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for got, expected in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert module.model.config._attn_implementation != VARLEN_ATTENTION  # restored after the packed forward


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_packed_forward_builds_no_mask(arch, monkeypatch):
    """transformers looks for packed sequences in position_ids before building a mask, and reads the verdict
    on the host (a GPU sync per forward); packed attention needs no mask, so that search must not run."""
    import transformers.masking_utils as masking

    def searched(*args, **kwargs):
        raise AssertionError("transformers searched position_ids for packed sequences")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", searched)
    module = LitSVDAdapter(make_tiny_model(arch), AdapterConfig(method="lora", rank=4, target_modules=["q_proj"]))
    initialize_adapters(module.model)
    loss = module.compute_loss(InstructionCollator(pad_token_id=0, pack=True)(EXAMPLES))
    assert torch.isfinite(loss)
    with pytest.raises(AssertionError, match="searched position_ids"):  # what a padded row with positions does
        module.model(input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[0, 1, 2]]), use_cache=False)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rows_padded_to_a_multiple_give_the_packed_loss_and_gradients(arch):
    module = LitSVDAdapter(
        make_tiny_model(arch), AdapterConfig(method="lora", rank=4, target_modules=TINY_TARGETS[arch])
    )
    initialize_adapters(module.model)
    with torch.no_grad():  # a non-zero LoRA B, so that the adapter's gradients are not trivially zero
        for _, layer in adapter_layers(module.model):
            layer.B.normal_(std=0.1)
    trainable = [p for p in module.parameters() if p.requires_grad]
    results = []
    for multiple in (None, 16):
        batch = InstructionCollator(pad_token_id=0, max_length=32, pack=True, pack_to_multiple_of=multiple)(EXAMPLES)
        loss = module.compute_loss(batch)
        results.append((batch["input_ids"].shape[1], loss.detach(), torch.autograd.grad(loss, trainable)))
    (tokens, loss, grads), (padded_tokens, padded_loss, padded_grads) = results
    assert (tokens, padded_tokens) == (35, 48)
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for got, expected in zip(padded_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_packing_refuses_a_model_without_the_attention_interface():
    model = make_tiny_model("llama")
    model._supports_attention_backend = False
    with pytest.raises(ValueError, match="LlamaForCausalLM does not dispatch attention.*pack_sequences=False"):
        with packed_attention(model):
            pass


def test_varlen_attention_outside_a_packed_batch_is_an_error():
    model = make_tiny_model("llama")
    with packed_attention(model), pytest.raises(ValueError, match="needs a packed batch"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


class _ListData(L.LightningDataModule):
    def __init__(self, pack: bool, multiple: int | None = None) -> None:
        super().__init__()
        self.collate = InstructionCollator(pad_token_id=0, pack=pack, pack_to_multiple_of=multiple)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(EXAMPLES * 2, batch_size=4, collate_fn=self.collate)


def fit_three_steps(module: LitSVDAdapter, data: L.LightningDataModule, root) -> None:
    """Three optimizer steps of ``module`` on ``data`` through a quiet CPU ``Trainer``."""
    quiet_cpu_trainer(root, max_steps=3).fit(module, datamodule=data)


def test_packed_training_follows_the_padded_trajectory(tmp_path):
    """Three optimizer steps through Trainer.fit end at the same adapter weights: padded, packed, or packed
    into rows rounded up to a multiple of 16 tokens."""
    base = make_tiny_model("llama")
    states = {}
    for layout, data in {
        "padded": _ListData(pack=False),
        "packed": _ListData(pack=True),
        "rounded": _ListData(pack=True, multiple=16),
    }.items():
        module = LitSVDAdapter(copy.deepcopy(base), AdapterConfig(method="pissa", rank=4), learning_rate=1e-2)
        fit_three_steps(module, data, tmp_path)
        states[layout] = adapter_state_dict(module.model)
    initial = adapter_state_dict(inject_adapters(copy.deepcopy(base), AdapterConfig(method="pissa", rank=4)))
    assert states["packed"].keys() == states["padded"].keys() == states["rounded"].keys() == initial.keys()
    for layout in ("packed", "rounded"):
        for name, tensor in states[layout].items():
            torch.testing.assert_close(tensor, states["padded"][name], rtol=1e-4, atol=1e-5, msg=f"{layout} {name}")
    # ...and that trajectory went somewhere: the trained factors are not the initial ones.
    assert any(not torch.allclose(states["packed"][name], initial[name], atol=1e-3) for name in initial)


class _PEFTModule(LitSVDAdapter):
    """A research subclass that injects PEFT's LoRA instead of ours (as recipes/studies does)."""

    def inject(self, model):
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TINY_TARGETS["llama"], init_lora_weights=False)
        return peft.get_peft_model(model, config)


def test_a_peft_wrapped_model_gets_the_same_fast_loss():
    module = _PEFTModule(make_tiny_model("llama"), AdapterConfig(method="lora", rank=4))
    padded = InstructionCollator(pad_token_id=0)(EXAMPLES)
    packed = InstructionCollator(pad_token_id=0, pack=True)(EXAMPLES)
    expected = module.model(**padded).loss  # PEFT + transformers' own loss on full logits
    assert module.compute_loss(padded).item() == pytest.approx(expected.item(), rel=1e-5)
    assert module.compute_loss(packed).item() == pytest.approx(expected.item(), rel=1e-5)


# ----- compiled decoder layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "sorsa", "osora", "dora", "vera"])
def test_adapter_layer_compiles_without_graph_breaks(method):
    """fullgraph=True raises on any graph break inside the adapter's forward (aot_eager: no C++ compiler)."""
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method=method, rank=4))
    layer = model.model.layers[0].mlp.up_proj
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x))
    (grad_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (grad_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager)
    with torch.no_grad():  # evaluation and generation (DoRA reuses its cached norm there when eager)
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("method", ["sorsa", "dora"])
def test_compiled_training_equals_eager_and_ends_eager(method, tmp_path):
    base = make_tiny_model("llama")
    states = {}
    for compile_layers in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)  # DoRA's LoRA init draws A at random
        module = LitSVDAdapter(
            copy.deepcopy(base),
            AdapterConfig(method=method, rank=4),
            learning_rate=1e-2,
            compile=compile_layers,
            compile_backend="aot_eager",
        )
        counters.clear()
        fit_three_steps(module, _ListData(pack=False), tmp_path)
        assert (counters["stats"]["unique_graphs"] >= 1) == compile_layers  # the compiled layers did run
        states[compile_layers] = adapter_state_dict(module.model)
        assert all(layer._compiled_call_impl is None for layer in module.model.model.layers)
    for name, tensor in states[True].items():
        torch.testing.assert_close(tensor, states[False][name], rtol=1e-4, atol=1e-5, msg=name)


def _recording(calls: list, checkpoint: functools.partial, *args, **kwargs):
    calls.append(checkpoint.keywords | kwargs)
    return checkpoint(*args, **kwargs)


@pytest.mark.parametrize("pack", [False, True])
def test_compiled_checkpointed_4bit_layers_train_as_eager_ones_in_one_graph(pack, tmp_path, monkeypatch):
    """A 4-bit base with gradient checkpointing: each layer (NF4 dequantization and all) compiles into one
    graph with no graph break, checkpointed around the compiled call, and three steps end where eager ones do;
    afterwards the layers are eager and checkpointed by transformers again."""
    pytest.importorskip("bitsandbytes")
    base = make_tiny_model("llama")
    states = {}
    for compile_layers in (False, True):
        torch._dynamo.reset()
        module = LitSVDAdapter(
            copy.deepcopy(base),
            AdapterConfig(method="sorsa", rank=4, base_quantization="nf4"),
            learning_rate=1e-2,
            gradient_checkpointing=True,
            compile=compile_layers,
            compile_backend="aot_eager",
        )
        counters.clear()
        checkpointed = []
        for layer in module.model.model.layers:  # each layer's checkpoint function, as transformers set it up
            recording = functools.partial(_recording, checkpointed, layer._gradient_checkpointing_func)
            monkeypatch.setattr(layer, "_gradient_checkpointing_func", recording)
        fit_three_steps(module, _ListData(pack=pack), tmp_path)
        monkeypatch.undo()
        assert counters["stats"]["unique_graphs"] == (1 if compile_layers else 0)
        assert not counters["graph_break"], dict(counters["graph_break"])
        if compile_layers:  # checkpointed around the compiled layer, with the packed attention's context
            assert len(checkpointed) == 3 * len(module.model.model.layers)
            assert all(k["context_fn"] is not None and k["use_reentrant"] is False for k in checkpointed)
        states[compile_layers] = adapter_state_dict(module.model)
        for layer in module.model.model.layers:  # eager again, checkpointed by transformers as before
            assert layer._compiled_call_impl is None and layer.gradient_checkpointing
            assert layer._gradient_checkpointing_func.keywords.get("context_fn") is not None
    for name, tensor in states[True].items():
        torch.testing.assert_close(tensor, states[False][name], rtol=1e-4, atol=1e-5, msg=name)


def _record_scalar_inputs(graph_module, example_inputs):
    _SCALAR_INPUTS.extend(x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 0)
    return graph_module.forward


_SCALAR_INPUTS: list[torch.Tensor] = []
if "lit_svd_record_scalar_inputs" not in list_backends(exclude_tags=()):
    register_backend(_record_scalar_inputs, name="lit_svd_record_scalar_inputs")


class _OwnTrainingStep(LitSVDAdapter):
    """Research code overriding the step: the compiled layers must behave the same under it."""

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch) * 1.0


@pytest.mark.parametrize(("arch", "module_class"), [("llama", LitSVDAdapter), ("qwen2", _OwnTrainingStep)])
def test_compiled_layers_take_floats_as_constants_not_cpu_tensors(arch, module_class, tmp_path):
    """A 0-dim CPU tensor input (RMSNorm's eps under dynamic=True) makes inductor skip CUDA graphs on a GPU."""
    torch._dynamo.reset()
    _SCALAR_INPUTS.clear()
    module = module_class(
        make_tiny_model(arch),
        AdapterConfig(method="lora", rank=4),
        compile=True,
        compile_backend="lit_svd_record_scalar_inputs",
    )
    counters.clear()
    fit_three_steps(module, _ListData(pack=False), tmp_path)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers were traced
    assert [(x.dtype, x.device.type) for x in _SCALAR_INPUTS] == []
    assert torch._dynamo.config.specialize_float is False  # dynamo's setting is back after fit


_CUDAGRAPH_BLOCKERS: list[str] = []


def _cudagraph_blockers(graph_module, example_inputs):
    """Record the ops that would keep this forward/backward graph out of a CUDA graph (CUDA-graph-unsafe ops,
    data-dependent shapes such as ``nonzero``'s), the check both CUDA-graph backends make."""
    from functorch.compile import make_boxed_func
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    if node := get_first_incompatible_cudagraph_node(graph_module):
        _CUDAGRAPH_BLOCKERS.append(node.format_node())
    return make_boxed_func(graph_module.forward)


if "lit_svd_cudagraph_blockers" not in list_backends(exclude_tags=()):
    register_backend(
        aot_autograd(fw_compiler=_cudagraph_blockers, bw_compiler=_cudagraph_blockers),
        name="lit_svd_cudagraph_blockers",
    )


@pytest.mark.parametrize("method", ["lora", "pissa", "olora", "sorsa", "osora"])
def test_compiled_layer_graphs_have_nothing_that_blocks_cuda_graphs(method, tmp_path):
    """Forward and backward graphs of every adapted decoder layer: no op that a CUDA graph cannot hold."""
    torch._dynamo.reset()
    _CUDAGRAPH_BLOCKERS.clear()
    module = LitSVDAdapter(
        make_tiny_model("llama"),
        AdapterConfig(method=method, rank=4),
        compile=True,
        compile_backend="lit_svd_cudagraph_blockers",
    )
    counters.clear()
    fit_three_steps(module, _ListData(pack=False), tmp_path)
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["graph_break"].values()) == 0
    assert _CUDAGRAPH_BLOCKERS == []


def test_compile_mode_reaches_every_decoder_layer_and_is_validated(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append((fn.__self__, kwargs)) or fn)
    module = LitSVDAdapter(
        make_tiny_model("llama"), AdapterConfig(method="lora", rank=4), compile=True, compile_mode="reduce-overhead"
    )
    initialize_adapters(module.model)
    module.on_train_start()
    layers = list(module.model.model.layers)
    assert [layer for layer, _ in calls] == layers and len(layers) == module.model.config.num_hidden_layers
    assert all(kw == {"dynamic": True, "backend": "inductor", "mode": "reduce-overhead"} for _, kw in calls)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    module.uncompile_decoder_layers()
    assert all(layer._compiled_call_impl is None for layer in layers)
    with pytest.raises(ValueError, match="compile_mode must be one of default, reduce-overhead.*got 'fast'"):
        LitSVDAdapter(make_tiny_model("llama"), compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode is an inductor option; compile_backend is 'aot_eager'"):
        LitSVDAdapter(
            make_tiny_model("llama"), compile=True, compile_backend="aot_eager", compile_mode="reduce-overhead"
        )


# ----- gradient checkpointing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["lora", "sorsa"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_run(arch, method, layout):
    # Packed batches used to crash in backward (CheckpointError: a different number of tensors saved): the
    # recomputation ran after packed_attention had switched the model back to its own attention.
    batch = InstructionCollator(pad_token_id=0, pack=layout == "packed")(EXAMPLES)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = AdapterConfig(method=method, rank=4, target_modules=TINY_TARGETS[arch])
        module = LitSVDAdapter(make_tiny_model(arch), config, gradient_checkpointing=checkpointing)
        initialize_adapters(module.model)
        with torch.no_grad():  # a non-zero LoRA B, so that the adapter's gradients are not trivially zero
            for _, layer in adapter_layers(module.model):
                if method == "lora":
                    layer.B.normal_(std=0.1)
        module.model.train()  # checkpointing is active in training mode only
        forwards = []
        # a hook inside the layer (the layer's own hooks stay outside the checkpoint and run once)
        inner = next(decoder_layers(module.model)[0].children())
        inner.register_forward_pre_hook(lambda *args, seen=forwards: seen.append(1))
        trainable = [p for p in module.parameters() if p.requires_grad]
        torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays the RNG state)
        loss = module.compute_loss(batch)
        grads = torch.autograd.grad(loss, trainable)
        results.append((loss.detach(), grads, len(forwards)))
    (loss, grads, plain_forwards), (checkpointed_loss, checkpointed_grads, checkpointed_forwards) = results
    assert (plain_forwards, checkpointed_forwards) == (1, 2)  # the layer really was recomputed in backward
    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for got, expected in zip(checkpointed_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert module.model.config._attn_implementation != VARLEN_ATTENTION  # restored after backward too


def test_padded_batches_calibration_and_generation_attend_without_cudnn_plans_also_when_recomputed(monkeypatch):
    # cuDNN attention plans every new shape (170 ms per call on an H200, bench/results/sdpa_backends.json);
    # padded rows, calibration batches and decoding steps change shape every call, so they leave it out —
    # and a checkpointed layer's recomputation must use the forward's backends (others save other tensors).
    from lit_svd.calibration import calibrate
    from lit_svd.eval.evaluate import generate_batch

    cudnn_enabled_at_call: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cudnn_enabled_at_call.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # PyTorch's default, restored after each block below
    batch = InstructionCollator(pad_token_id=0)(EXAMPLES)
    module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(rank=4), gradient_checkpointing=True)
    initialize_adapters(module.model)
    module.model.train()
    module.compute_loss(batch).backward()
    layers = len(decoder_layers(module.model))
    assert cudnn_enabled_at_call == [False] * (2 * layers)  # forward, then the recomputation in backward
    assert torch.backends.cuda.cudnn_sdp_enabled()

    cudnn_enabled_at_call.clear()
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method="loraga", rank=2), initialize=False)
    calibrate(model, [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}], pack_batches=False)
    assert cudnn_enabled_at_call == [False] * layers and torch.backends.cuda.cudnn_sdp_enabled()
    # Packed by calibrate (its default): on the CPU, one call per sequence, also without cuDNN.
    cudnn_enabled_at_call.clear()
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method="loraga", rank=2), initialize=False)
    calibrate(model, [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}])
    assert cudnn_enabled_at_call == [False] * (len(EXAMPLES) * layers) and torch.backends.cuda.cudnn_sdp_enabled()

    cudnn_enabled_at_call.clear()
    tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 1, "batch_decode": lambda self, t, **k: []})()
    generate_batch(module.model.eval(), tokenizer, batch["input_ids"][:, :4], batch["attention_mask"][:, :4], 3)
    assert cudnn_enabled_at_call == [False] * (3 * layers) and torch.backends.cuda.cudnn_sdp_enabled()


def test_gradient_checkpointing_and_cuda_graph_layers_are_refused_together():
    with pytest.raises(ValueError, match="cuda_graph_layers and gradient_checkpointing cannot be combined"):
        LitSVDAdapter(
            make_tiny_model("llama"), AdapterConfig(rank=4), gradient_checkpointing=True, cuda_graph_layers=True
        )


def test_checkpointing_is_turned_on_without_transformers_deprecation_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(rank=4), gradient_checkpointing=True)
    deprecated = [str(w.message) for w in caught if "checkpointing_enable" in str(w.message)]
    assert deprecated == []
    assert any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(module.model))
