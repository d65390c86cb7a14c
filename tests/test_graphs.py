"""CUDA-graphed decoder layers (``lit_svd.graphs``): everything around the capture, on the CPU.

CI has no GPU, so ``torch.cuda.make_graphed_callables`` is replaced by a stand-in that checks what the real
one insists on (tensor-only arguments, no hooks, autocast cache off), runs its warm-up forward and backward
passes with the sample arguments, records them and returns the callables uncaptured. What the tests show:
the layers called through the graph wrapper compute what the eager layers compute, one capture happens per
row shape with the right sample inputs, and every call that a graph cannot replay stays eager.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny_model
from lightning_helpers import quiet_cpu_trainer
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from lit_svd import AdapterConfig
from lit_svd.data import InstructionCollator
from lit_svd.graphs import LayerGraphs
from lit_svd.inject import adapter_state_dict, initialize_adapters
from lit_svd.module import LitSVDAdapter, decoder_layers


class RecordingCapture:
    """``make_graphed_callables`` on the CPU, without the graphs."""

    def __init__(self) -> None:
        self.captures: list[list[tuple[tuple[int, ...], bool]]] = []

    def __call__(self, callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
        for device_type in ("cpu", "cuda"):
            assert not (torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled())
        for callable_, args in zip(callables, sample_args, strict=True):
            assert all(isinstance(arg, torch.Tensor) for arg in args)
            assert not (callable_._forward_hooks or callable_._forward_pre_hooks or callable_._backward_hooks)
            for _ in range(num_warmup_iters):
                outputs = [o for o in tree_leaves(callable_(*args)) if o.requires_grad]
                inputs = [a for a in args if a.requires_grad] + [p for p in callable_.parameters() if p.requires_grad]
                torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs], allow_unused=True)
        self.captures.append([(tuple(args[0].shape), args[0].requires_grad) for args in sample_args])
        return callables


EXAMPLES = [
    {"input_ids": list(range(1, length + 1)), "prompt_length": prompt}
    for length, prompt in [(9, 3), (5, 2), (14, 6), (7, 1), (3, 1), (4, 2), (6, 2), (2, 1)]
]


def _module(arch: str, capture: RecordingCapture | None, base=None, **kwargs) -> LitSVDAdapter:
    module = LitSVDAdapter(
        copy.deepcopy(base) if base is not None else make_tiny_model(arch),
        AdapterConfig(method="sorsa", rank=4, target_modules=TINY_TARGETS[arch]),
        learning_rate=1e-2,
        cuda_graph_layers=capture is not None,
        **kwargs,
    )
    module.layer_graph_capture = capture
    return module


def _installed_graphs(**graph_kwargs) -> tuple[LitSVDAdapter, LayerGraphs, RecordingCapture]:
    """An initialised tiny Llama (SORSA) module in training mode whose layers go through ``LayerGraphs``."""
    module = _module("llama", None)
    initialize_adapters(module.model)
    capture = RecordingCapture()
    graphs = LayerGraphs(decoder_layers(module.model), capture=capture, **graph_kwargs)
    graphs.install()
    module.train()
    return module, graphs, capture


def _packed(examples, multiple=8):
    return InstructionCollator(pad_token_id=0, max_length=16, pack=True, pack_to_multiple_of=multiple)(examples)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graphed_layers_give_the_eager_loss_and_gradients_with_one_capture_per_row_shape(arch):
    eager = _module(arch, None)
    initialize_adapters(eager.model)  # SORSA: every factor non-zero, so every gradient is
    graphed = copy.deepcopy(eager)
    capture = RecordingCapture()
    graphs = LayerGraphs(decoder_layers(graphed.model), capture=capture)
    graphs.install()
    eager.train(), graphed.train()
    # Rows of 40, 16 and 40 tokens; the third has other sequence boundaries and tokens than the first.
    other = [{"input_ids": list(range(20, 20 + n)), "prompt_length": p} for n, p in [(10, 2), (4, 1), (13, 5), (8, 3)]]
    batches = [_packed(EXAMPLES[:4]), _packed(EXAMPLES[4:]), _packed(other)]
    for batch in batches:
        results = []
        for module in (eager, graphed):
            trainable = [p for p in module.parameters() if p.requires_grad]
            loss = module.compute_loss(batch)
            results.append((loss.detach(), torch.autograd.grad(loss, trainable)))
        (loss, grads), (graphed_loss, graphed_grads) = results
        assert graphed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        for got, expected in zip(graphed_grads, grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    layers = len(decoder_layers(graphed.model))
    # Two shapes, two captures (the third batch replays the first one's graphs with its own inputs); every
    # layer gets the row's hidden states, and only the first layer's input (from the frozen embedding) needs
    # no gradient.
    assert graphs.captures == 2
    assert [[shape for shape, _ in capture_] for capture_ in capture.captures] == [
        [(1, 40, 32)] * layers,
        [(1, 16, 32)] * layers,
    ]
    assert [requires_grad for _, requires_grad in capture.captures[0]] == [False] + [True] * (layers - 1)
    graphs.remove()
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(graphed.model))


def test_calls_a_graph_cannot_replay_stay_eager():
    module, _, capture = _installed_graphs()
    padded = InstructionCollator(pad_token_id=0)(EXAMPLES[:4])
    module.compute_loss(padded)  # no cu_seq_lens: attention needs its mask
    with torch.no_grad():
        module.compute_loss(_packed(EXAMPLES[:4]))  # no backward to replay
    module.eval()
    module.compute_loss(_packed(EXAMPLES[:4]))  # evaluation mode
    assert capture.captures == []
    module.train()
    module.compute_loss(_packed(EXAMPLES[:4]))
    assert len(capture.captures) == 1


def test_capture_runs_with_the_autocast_cache_off_and_keys_on_the_autocast_dtype():
    module, _, capture = _installed_graphs()
    batch = _packed(EXAMPLES[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        module.compute_loss(batch)  # the stand-in asserts that the cache is off inside the capture
        assert torch.is_autocast_cache_enabled()
    module.compute_loss(batch)  # float32 now: a graph captured under bf16 autocast would replay bf16 kernels
    assert len(capture.captures) == 2


def test_trainer_fit_with_graphed_layers_follows_the_eager_trajectory_and_ends_eager(tmp_path):
    base = make_tiny_model("llama")
    collate = InstructionCollator(pad_token_id=0, max_length=16, pack=True, pack_to_multiple_of=8)
    states, captures = {}, {}
    for graphs_on in (False, True):
        capture = RecordingCapture() if graphs_on else None
        module = _module("llama", capture, base=base)
        quiet_cpu_trainer(tmp_path, max_steps=4).fit(
            module, train_dataloaders=DataLoader(EXAMPLES, batch_size=4, collate_fn=collate)
        )
        states[graphs_on] = adapter_state_dict(module.model)
        captures[graphs_on] = capture.captures if capture else None
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(module.model))
        assert module._layer_graphs is None
    assert len(captures[True]) == 2  # rows of 40 and 16 tokens, each captured once over four steps
    for name, tensor in states[True].items():
        torch.testing.assert_close(tensor, states[False][name], rtol=1e-5, atol=1e-6, msg=name)


def _fit_one_step(module: LitSVDAdapter, root, **trainer_kwargs) -> None:
    collate = InstructionCollator(pad_token_id=0, pack=True, pack_to_multiple_of=8)
    quiet_cpu_trainer(root, max_steps=1, **trainer_kwargs).fit(
        module, train_dataloaders=DataLoader(EXAMPLES, batch_size=4, collate_fn=collate)
    )


def test_graphed_layers_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph_layers and compile are alternatives"):
        LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(rank=4), cuda_graph_layers=True, compile=True)
    with pytest.raises(ValueError, match=r"needs a CUDA device; this module is on cpu"):
        _fit_one_step(LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(rank=4), cuda_graph_layers=True), tmp_path)
    with pytest.raises(ValueError, match=r"cannot accumulate gradients \(accumulate_grad_batches=2\)"):
        _fit_one_step(_module("llama", RecordingCapture()), tmp_path, accumulate_grad_batches=2)
    model = make_tiny_model("llama")
    layers = decoder_layers(model)
    layers[1].compile(backend="eager")
    with pytest.raises(ValueError, match=r"decoder layer 1 \(LlamaDecoderLayer\) is compiled"):
        LayerGraphs(layers).install()
    with pytest.raises(ValueError, match="at least one decoder layer"):
        LayerGraphs([])


def test_a_layer_whose_input_starts_needing_a_gradient_is_not_replayed_silently():
    module, _, _ = _installed_graphs()
    batch = _packed(EXAMPLES[:4])
    module.compute_loss(batch)  # captured with a frozen embedding: layer 0's input needs no gradient
    module.model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="decoder layer 0 was captured with hidden states that need no gradient"):
        module.compute_loss(batch)


def test_a_parameter_replaced_after_capture_is_an_error_not_a_stale_graph():
    module, graphs, _ = _installed_graphs()
    batch = _packed(EXAMPLES[:4])
    module.compute_loss(batch)
    with torch.no_grad():  # in place, as an optimizer step: the graphs stay valid
        for parameter in module.model.parameters():
            if parameter.requires_grad:
                parameter.mul_(0.5)
    module.compute_loss(batch)
    layer = decoder_layers(module.model)[1]
    layer.self_attn.q_proj.U.data = layer.self_attn.q_proj.U.data.clone()
    with pytest.raises(RuntimeError, match=r"decoder layer 1: parameter 'self_attn.q_proj.U' was replaced"):
        module.compute_loss(batch)
    graphs.remove()
    graphs.install()  # a fresh capture reads the new tensor
    module.compute_loss(batch)


def test_shapes_beyond_the_limit_run_eagerly_with_one_warning():
    module, graphs, capture = _installed_graphs(max_shapes=1)
    module.compute_loss(_packed(EXAMPLES[:4]))
    layers = len(decoder_layers(module.model))
    with pytest.warns(UserWarning, match=r"1 input shapes captured already; this new one \(1, 16, 32\)") as caught:
        module.compute_loss(_packed(EXAMPLES[4:]))
        module.compute_loss(_packed(EXAMPLES[4:]))
    assert len(caught) == 1 and len(capture.captures) == 1 and graphs.eager_calls == 2 * layers


@pytest.mark.parametrize(
    ("pack", "multiple", "message"),
    [(False, None, "the data module does not pack"), (True, None, "without pack_to_multiple_of")],
)
def test_fit_with_graphed_layers_warns_about_data_that_defeats_them(pack, multiple, message, tmp_path):
    class Data(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.pack_sequences, self.pack_to_multiple_of = pack, multiple
            self.collate = InstructionCollator(pad_token_id=0, pack=pack, pack_to_multiple_of=multiple)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(EXAMPLES, batch_size=4, collate_fn=self.collate)

    module = _module("llama", RecordingCapture())
    trainer = quiet_cpu_trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match=message):
        trainer.fit(module, datamodule=Data())


def test_graphed_layers_on_the_cpu_without_a_stand_in_name_the_device():
    model = make_tiny_model("llama")
    graphs = LayerGraphs(decoder_layers(model))
    graphs.install()
    model.train()
    batch = _packed(EXAMPLES[:4])
    from lit_svd.attention import packed_attention

    with packed_attention(model), pytest.raises(ValueError, match="need a CUDA device; the hidden states are on cpu"):
        model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=batch["cu_seq_lens"],
            cu_seq_lens_k=batch["cu_seq_lens"],
            max_length_q=batch["max_length"],
            max_length_k=batch["max_length"],
            use_cache=False,
        )
