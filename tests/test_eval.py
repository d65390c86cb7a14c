"""Answer extraction on real references, hand-written generations, metrics (incl. DDP sync), evaluate()."""

from __future__ import annotations

import importlib
import json
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data_fixtures import DATA_DIR, smollm2_tokenizer

from lit_svd.data import CommonsenseDataModule, GSM8KDataModule, build_prompt
from lit_svd.eval import (
    COMMONSENSE_TASKS,
    ChoiceAccuracy,
    GSM8KAccuracy,
    MATHAccuracy,
    TaskAccuracy,
    choice_answer,
    evaluate,
    generate_batch,
    greedy_decode,
    gsm8k_answer,
    gsm8k_is_correct,
    gsm8k_reference,
    is_correct,
    last_boxed,
    math_answer,
    math_is_correct,
    normalize_math_answer,
)
from lit_svd.eval.decode import GraphedGreedyDecoder

LOCAL_COMMONSENSE = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


# ------------------------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("The answer is: 1,234.", "1234"),
        ("She pays $18.00", "18"),
        ("… so 5 apples. The answer is 7", "7"),
        ("3 + 4 = 7 apples, then 7 * 2 = 14.\nThe answer is: 14", "14"),
        ("The answer is 7. Check: 7 + 1 = 8", "7"),  # the answer line wins over the last number
        ("The final answer is -3.50", "-3.5"),
        ("It costs 1,000,000 dollars", "1000000"),
        ("Half of it: 0.50", "0.5"),
        ("The answer is: 3/4", "0.75"),  # fractions are compared by value
        ("The answer is: 1/3", "1/3"),
        ("The answer is: 12\n\n### Instruction:\nWhat is 5 + 5?\n\n### Response: 10", "12"),
        ("The answer is unknown, but 3 people came", "3"),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_gsm8k_answer_extraction(generation, expected):
    assert gsm8k_answer(generation) == expected


def test_gsm8k_numeric_comparison():
    assert gsm8k_is_correct("The answer is: 18.0", "18")
    assert gsm8k_is_correct("total $1,234.00", "1234")
    assert gsm8k_is_correct("The answer is 0.5", "1/2")
    assert gsm8k_is_correct("The answer is 5", "Janet pays <<2+3=5>>5\n#### 5")  # full solution as reference
    assert not gsm8k_is_correct("The answer is 17", "18")
    assert not gsm8k_is_correct("no number here", "18")
    with pytest.raises(ValueError, match="no '####' answer line"):
        gsm8k_reference("She makes 18 dollars.")


def test_every_gsm8k_reference_parses():
    for split, count in (("train", 7473), ("test", 1319)):
        records = read_jsonl(DATA_DIR / "gsm8k" / f"{split}.jsonl")
        assert len(records) == count
        for record in records:
            reference = gsm8k_reference(record["answer"])
            # A model that writes the reference solution itself is judged correct.
            assert gsm8k_is_correct(record["answer"].replace("####", "The answer is"), reference)


# ------------------------------------------------------------------------------------------------- MATH


def test_math500_boxed_answers_match_the_answer_field():
    records = read_jsonl(DATA_DIR / "math500" / "test.jsonl")
    assert len(records) == 500
    exceptions = []
    for index, record in enumerate(records):
        boxed = last_boxed(record["solution"])
        if boxed is None or normalize_math_answer(boxed) != normalize_math_answer(record["answer"]):
            exceptions.append((index, boxed, record["answer"]))
    matched = 500 - len(exceptions)
    print(f"MATH-500: {matched}/500 boxed answers equal the answer field; exceptions: {exceptions}")
    assert len(exceptions) <= 10, exceptions  # >= 98%
    assert sum(math_is_correct(record["solution"], record["answer"]) for record in records) >= 490


def test_math500_normalisation_is_invariant_to_notation_but_keeps_answers_apart():
    answers = [record["answer"] for record in read_jsonl(DATA_DIR / "math500" / "test.jsonl")]
    for answer in answers:
        variants = [
            answer.replace("\\frac", "\\dfrac"),
            answer.replace("\\frac", "\\tfrac"),
            f"  {answer} ",
            answer.replace("(", "\\left(").replace(")", "\\right)"),
        ]
        for variant in variants:
            assert normalize_math_answer(variant) == normalize_math_answer(answer), (variant, answer)
    # Normalisation must not collapse different answers: as many distinct forms as distinct raw answers.
    distinct_raw = {answer.replace(" ", "") for answer in answers}
    assert len({normalize_math_answer(answer) for answer in answers}) >= 0.97 * len(distinct_raw)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\frac12", "0.5"),
        ("\\tfrac{3}{4}", "3/4"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("10\\text{ cm}", "10"),
        ("x = 5", "5"),
        ("\\$32", "32"),
        ("50\\%", "50"),
        (".5", "0.5"),
        ("2\\sqrt2", "2\\sqrt{2}"),
        ("\\!1,\\!000", "1,000"),
    ],
)
def test_math_normalisation_equivalences(first, second):
    assert normalize_math_answer(first) == normalize_math_answer(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [("\\frac{1}{2}", "\\frac{1}{3}"), ("2\\sqrt{2}", "\\sqrt{2}"), ("(3, 4)", "[3, 4]"), ("-2", "2")],
)
def test_math_normalisation_keeps_different_answers_apart(first, second):
    assert normalize_math_answer(first) != normalize_math_answer(second)


def test_math_answer_extraction():
    assert last_boxed("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{1}{2}}} and finally \\boxed{{3}^{2}}") == "{3}^{2}"
    assert last_boxed("the answer is $\\boxed 5$.") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None
    assert math_answer("Therefore ... The answer is: \\frac{3}{5}.") == "\\frac{3}{5}"
    assert math_answer("The answer is: $12$") == "12"
    assert math_answer("no final answer given") is None
    assert math_is_correct("so the result is $\\boxed{\\dfrac12}$", "\\frac{1}{2}")
    assert math_is_correct("The answer is: 0.5", "\\frac12")
    assert not math_is_correct("so the result is $\\boxed{\\frac{1}{3}}$", "\\frac{1}{2}")
    assert not math_is_correct("I don't know", "\\frac{1}{2}")
    assert not math_is_correct("\\boxed{", "\\frac{1}{2}")


# ------------------------------------------------------------------------------------------ commonsense


@pytest.mark.parametrize("task", LOCAL_COMMONSENSE)
def test_choice_answer_recovers_every_gold_answer(task):
    splits = ["test", "train"] if (DATA_DIR / "commonsense" / task / "train.json").exists() else ["test"]
    for split in splits:
        records = json.loads((DATA_DIR / "commonsense" / task / f"{split}.json").read_text())
        assert records
        wrong = [r for r in records if choice_answer(r["output"], task) != r["answer"]]
        assert wrong == [], wrong[:3]
        assert all(is_correct(r["output"], r["answer"], task) for r in records)


def test_choice_answer_edge_cases():
    assert choice_answer("The correct answer is True", "boolq") == "true"
    assert choice_answer("the correct answer is answer2, not answer1", "ARC-Easy") == "answer2"
    assert choice_answer("ending3", "hellaswag") == "ending3"
    assert choice_answer("option1 is untrue", "boolq") is None  # "untrue" is not the word "true"
    assert choice_answer("the correct answer is solution3", "piqa") is None
    assert choice_answer("", "winogrande") is None
    with pytest.raises(ValueError, match=r"unknown commonsense task 'arc'; choose one of: boolq, piqa"):
        choice_answer("answer1", "arc")
    with pytest.raises(ValueError, match="unknown evaluation task 'svamp'"):
        is_correct("1", "1", "svamp")


# ---------------------------------------------------------------------------------------------- metrics


def test_gsm8k_and_math_accuracy():
    metric = GSM8KAccuracy()
    metric.update(["The answer is: 1,234.", "$18.00", "", "The answer is 7"], ["1234", "18", "3", "8"])
    assert float(metric.compute()) == pytest.approx(0.5)
    metric.update(["no idea"], ["5"])
    assert float(metric.compute()) == pytest.approx(0.4)
    metric.reset()
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert float(metric.compute()) == 0.0
    math_metric = MATHAccuracy()
    math_metric.update(["\\boxed{\\dfrac12}", "\\boxed{\\frac{1}{2"], ["\\frac{1}{2}", "\\frac{1}{2}"])
    assert float(math_metric.compute()) == pytest.approx(0.5)


def test_choice_accuracy_per_task_and_average():
    metric = ChoiceAccuracy(["boolq", "piqa", "winogrande"])
    metric.update(
        ["the correct answer is true", "false", "solution1", "solution1", "nothing"],
        ["true", "true", "solution1", "solution2", "solution1"],
        ["boolq", "boolq", "piqa", "piqa", "piqa"],
    )
    values = metric.compute()
    assert float(values["boolq"]) == pytest.approx(0.5)
    assert float(values["piqa"]) == pytest.approx(1 / 3)
    assert torch.isnan(values["winogrande"])  # no examples yet
    assert float(values["average"]) == pytest.approx((0.5 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="pass tasks= for every example"):
        metric.update(["true"], ["true"])
    with pytest.raises(ValueError, match="'hellaswag' is not one of this metric's tasks"):
        metric.update(["ending1"], ["ending1"], ["hellaswag"])
    with pytest.raises(ValueError, match="got 2 predictions but 1 references"):
        metric.update(["true", "false"], ["true"], ["boolq", "boolq"])
    with pytest.raises(ValueError, match=r"unknown commonsense task\(s\) \['gsm8k'\]"):
        ChoiceAccuracy(["gsm8k"])
    assert ChoiceAccuracy().tasks == COMMONSENSE_TASKS


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metric = TaskAccuracy(["gsm8k", "boolq"])
        if rank == 0:  # gsm8k 1 of 2, boolq 1 of 1
            metric.update(["The answer is 1", "The answer is 2", "true"], ["1", "3", "true"], ["gsm8k"] * 2 + ["boolq"])
        else:  # gsm8k 1 of 1, boolq 0 of 1
            metric.update(["The answer is 4", "true"], ["4", "false"], ["gsm8k", "boolq"])
        values = {task: float(value) for task, value in metric.compute().items()}
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(values, handle)
    finally:
        dist.destroy_process_group()


def test_metric_state_is_summed_across_ddp_ranks(tmp_path):
    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the children inherit the imported modules, so two ranks start in well under a second.
    context = mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    expected = {"gsm8k": 2 / 3, "boolq": 1 / 2, "average": (2 / 3 + 1 / 2) / 2}
    for rank in (0, 1):  # every rank sees the global counts, not its own
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- evaluate


class AnswerKeyModel(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` writes "The answer is: <reference>" after each prompt.

    It checks the call the way HF ``generate`` would be used for evaluation: left-padded prompts, greedy,
    KV cache, EOS given.
    """

    def __init__(self, tokenizer, answers: dict[str, str], wrong: bool = False) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.wrong = tokenizer, answers, wrong
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
        assert kwargs["eos_token_id"] == self.tokenizer.eos_token_id
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            answer = self.answers[prompt]
            text = f" Let me think. The answer is: {int(answer) + 1 if self.wrong else answer}"
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        width = max(len(row) for row in rows)
        padded = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        for index, row in enumerate(rows):
            padded[index, : len(row)] = row  # after EOS, generate pads on the right
        return padded


def gsm8k_answer_key(count: int) -> dict[str, str]:
    records = read_jsonl(DATA_DIR / "gsm8k" / "test.jsonl")[:count]
    return {build_prompt(record["question"]): gsm8k_reference(record["answer"]) for record in records}


@pytest.mark.parametrize(("wrong", "accuracy"), [(False, 1.0), (True, 0.0)])
def test_evaluate_scores_generations(tokenizer, tmp_path, wrong, accuracy):
    datamodule = GSM8KDataModule(data_dir=str(DATA_DIR / "gsm8k"), cache_dir=str(tmp_path), max_eval_examples=8)
    model = AnswerKeyModel(tokenizer, gsm8k_answer_key(8), wrong=wrong)
    result = evaluate(model, tokenizer, datamodule, max_new_tokens=32, batch_size=3, return_predictions=True)
    assert result["accuracy"] == accuracy and result["num_examples"] == 8
    assert len(model.calls) == 3 and model.calls[0]["max_new_tokens"] == 32  # batches of 3, 3, 2
    assert [p["correct"] for p in result["predictions"]] == [not wrong] * 8
    # batches are formed longest prompt first, but predictions come back in dataset order
    references = [gsm8k_reference(r["answer"]) for r in read_jsonl(DATA_DIR / "gsm8k" / "test.jsonl")[:8]]
    assert [p["reference"] for p in result["predictions"]] == references
    assert result["predictions"][0]["generation"].startswith(" Let me think.")  # new tokens only


def test_evaluate_commonsense_reports_per_task(tokenizer, tmp_path):
    tasks = ["boolq", "winogrande"]
    datamodule = CommonsenseDataModule(
        data_dir=str(DATA_DIR / "commonsense"), tasks=tasks, max_eval_examples=4, cache_dir=str(tmp_path)
    )

    class AlwaysTrue(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kwargs):
            answer = tokenizer(" the correct answer is true", add_special_tokens=False)["input_ids"]
            return torch.cat([input_ids, torch.tensor([answer] * len(input_ids))], dim=1)

    result = evaluate(AlwaysTrue(), tokenizer, datamodule, progress=False)
    gold = {t: json.loads((DATA_DIR / "commonsense" / t / "test.json").read_text())[:4] for t in tasks}
    expected_boolq = sum(record["answer"] == "true" for record in gold["boolq"]) / 4
    assert result["accuracy/boolq"] == pytest.approx(expected_boolq)
    assert result["accuracy/winogrande"] == 0.0  # "true" is not a winogrande answer word
    assert result["accuracy"] == pytest.approx(expected_boolq / 2)
    assert result["num_examples"] == 8


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def test_batched_left_padded_generation_equals_one_by_one(tokenizer, tmp_path):
    datamodule = GSM8KDataModule(data_dir=str(DATA_DIR / "gsm8k"), cache_dir=str(tmp_path), max_eval_examples=6)
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    model = tiny_llama(len(tokenizer))
    batch = next(iter(datamodule.eval_dataloader(batch_size=6)))
    assert not bool(batch["prompt_attention_mask"].all())  # prompts differ in length: padding is exercised
    batched = generate_batch(model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], 12)
    for row in range(6):
        mask = batch["prompt_attention_mask"][row].bool()
        prompt = batch["prompt_input_ids"][row][mask].unsqueeze(0)
        single = generate_batch(model, tokenizer, prompt, torch.ones_like(prompt), 12)
        assert batched[row] == single[0]


def test_length_sorted_and_static_cache_evaluation_equal_dataset_order_generation(tokenizer, tmp_path):
    datamodule = GSM8KDataModule(data_dir=str(DATA_DIR / "gsm8k"), cache_dir=str(tmp_path), max_eval_examples=7)
    model = tiny_llama(len(tokenizer), seed=3)
    runs = {
        (sort, compile, static, graphed): evaluate(
            model,
            tokenizer,
            datamodule,
            max_new_tokens=10,
            batch_size=3,
            progress=False,
            return_predictions=True,
            sort_by_length=sort,
            compile=compile,
            static_cache=static,
            graphed_decode=graphed,
        )
        for sort, compile, static, graphed in [
            (False, False, False, False),
            (True, False, False, False),
            (True, True, False, False),
            (True, False, True, False),
            (True, False, False, True),
        ]
    }
    expected = [p["generation"] for p in runs[(False, False, False, False)]["predictions"]]
    assert len(set(expected)) > 1  # a model that says the same thing everywhere would hide a reordering
    for key, run in runs.items():
        assert [p["generation"] for p in run["predictions"]] == expected, key


def test_the_module_generates_the_same_answers_with_a_static_cache(tokenizer, tmp_path):
    from lit_svd import AdapterConfig, LitSVDAdapter, initialize_adapters

    datamodule = GSM8KDataModule(
        data_dir=str(DATA_DIR / "gsm8k"), cache_dir=str(tmp_path), max_eval_examples=5, eval_batch_size=5
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    batch = next(iter(datamodule.eval_dataloader()))
    answers, caches = {}, {}
    for static in (False, True):
        config = AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"])
        module = LitSVDAdapter(
            tiny_llama(len(tokenizer), seed=3), config, max_new_tokens=10, static_cache_generation=static
        )
        initialize_adapters(module.model)
        with torch.no_grad():  # adapters that change the output, so that they take part in generation
            for name, p in module.model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
        module.tokenizer = tokenizer
        generate = module.model.generate

        def recording(*args, _generate=generate, _static=static, **kwargs):
            caches[_static] = kwargs.get("cache_implementation")
            return _generate(*args, **kwargs)

        module.model.generate = recording
        answers[static] = module.generate_answers(batch)
    assert caches == {False: None, True: "static"}
    assert len(set(answers[False])) > 1
    assert answers[True] == answers[False]


def sharp_attention_llama(vocab_size: int, seed: int):
    """A tiny Llama whose attention is far from uniform, so that positions and masks change its tokens."""
    model = tiny_llama(vocab_size, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return model


def _prompts_with_padding(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    return ids, mask


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_graphed_greedy_decode_gives_generates_tokens_and_stops_where_generate_stops(implementation):
    model = sharp_attention_llama(300, seed=4)
    model.config._attn_implementation = implementation
    ids, mask = _prompts_with_padding(300)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    free = free[:, ids.shape[1] :]
    # An EOS that row 1 reaches at its 6th token, so rows stop at different steps (or not at all).
    eos = int(free[1, 5])
    assert 0 < int((free == eos).any(-1).sum()) < 4
    for cache in ("static", "dynamic"):
        expected = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            cache_implementation=cache,
        )[:, ids.shape[1] :]
        decoded = greedy_decode(model, ids, mask, 24, eos, pad_token_id=0, check_every=4)
        assert torch.equal(decoded, expected), cache
    # Several EOS ids that end every row by its 3rd token: decoding ends where generate's does, not at 24.
    eos_ids = sorted(set(free[:, 2].tolist()))
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos_ids, pad_token_id=0
    )[:, ids.shape[1] :]
    decoded = greedy_decode(model, ids, mask, 24, eos_ids, pad_token_id=0)
    assert decoded.shape[1] <= 3
    assert torch.equal(decoded, expected)
    # No EOS at all: every row runs the whole budget, as generate's without one.
    assert torch.equal(greedy_decode(model, ids, mask, 24, None, pad_token_id=0), free)


def test_the_graphed_decoding_step_reads_nothing_back_to_the_host(monkeypatch):
    """What a CUDA graph capture needs, checked on the CPU: no tensor value reaches Python inside the step
    (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` …), also with adapters in the layers."""
    from lit_svd import AdapterConfig, inject_adapters

    for method in ("lora", "sorsa"):
        model = sharp_attention_llama(300, seed=5)
        inject_adapters(model, AdapterConfig(method=method, rank=2, target_modules=["q_proj", "down_proj"]))
        ids, mask = _prompts_with_padding(300)
        decoder = GraphedGreedyDecoder(model, ids, mask, 6, [7], pad_token_id=0)
        reads = []

        def refuse(name, reads=reads):
            def read(tensor, *args, **kwargs):
                reads.append(name)
                raise RuntimeError(f"host read: Tensor.{name}")

            return read

        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
                patch.setattr(torch.Tensor, name, refuse(name))
            for _ in range(4):
                decoder.step()
        assert reads == []
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=7, pad_token_id=0
        )[:, ids.shape[1] :]
        assert torch.equal(decoder.tokens[:, :5], expected), method


def test_graphed_greedy_decode_refuses_what_it_cannot_capture():
    model = tiny_llama(300)
    ids, mask = _prompts_with_padding(300)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2'.*attn_implementation='sdpa'"):
        greedy_decode(model, ids, mask, 4, 7, 0)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        greedy_decode(model, ids, mask, 0, 7, 0)
    with pytest.raises(ValueError, match="cuda_graph=True needs the prompts on a CUDA device, not cpu"):
        greedy_decode(model, ids, mask, 4, 7, 0, cuda_graph=True)


def test_the_module_decodes_with_the_graphed_decoder_when_asked(tokenizer, tmp_path, monkeypatch):
    from lit_svd import AdapterConfig, LitSVDAdapter

    evaluate_module = importlib.import_module("lit_svd.eval.evaluate")  # lit_svd.eval.evaluate is the function
    datamodule = GSM8KDataModule(
        data_dir=str(DATA_DIR / "gsm8k"), cache_dir=str(tmp_path), max_eval_examples=5, eval_batch_size=5
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    batch = next(iter(datamodule.eval_dataloader()))
    answers, decoder_calls = {}, []
    decode = evaluate_module.greedy_decode

    def recording(*args, **kwargs):
        decoder_calls.append(args[2].shape)
        return decode(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "greedy_decode", recording)
    for graphed in (False, True):
        config = AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj", "v_proj"])
        module = LitSVDAdapter(
            sharp_attention_llama(len(tokenizer), seed=3), config, max_new_tokens=10, graphed_generation=graphed
        )
        module.tokenizer = tokenizer
        answers[graphed] = module.generate_answers(batch)
    assert decoder_calls == [batch["prompt_attention_mask"].shape]  # only the graphed module used it
    assert len(set(answers[False])) > 1
    assert answers[True] == answers[False]


def test_generation_stops_at_eos(tokenizer):
    model = tiny_llama(len(tokenizer))
    # An output layer whose bias makes EOS the greedy choice after any prompt.
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    prompt = tokenizer(["Question: what is 1 + 1?", "Q: 2?"], return_tensors="pt", padding=True, padding_side="left")
    texts = generate_batch(model, tokenizer, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=20)
    assert texts == ["", ""]
    output = model.generate(
        **prompt, max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
    )
    assert output.shape[1] == prompt["input_ids"].shape[1] + 1  # stopped right after EOS, not at 20 tokens


def test_lightning_module_generates_and_updates_the_datamodule_metric(tokenizer, tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    class TinyGenerator(LightningModule):
        def __init__(self, metric) -> None:
            super().__init__()
            self.model = tiny_llama(len(tokenizer)).train()
            self.tokenizer = tokenizer  # the datamodule picks this tokenizer up in setup()
            self.metric = metric
            self.losses: list[float] = []
            self.counts: list[int] = []

        def training_step(self, batch, batch_index):
            loss = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            self.losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_index):
            texts = generate_batch(
                self.model, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], 4
            )
            self.metric.update(texts, batch["references"], batch["task"])

        def on_validation_epoch_end(self):
            self.counts.append(int(self.metric.total.sum()))
            self.log("val_accuracy", self.metric.compute())
            self.metric.reset()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    datamodule = GSM8KDataModule(
        data_dir=str(DATA_DIR / "gsm8k"),
        cache_dir=str(tmp_path),
        max_train_examples=16,
        max_eval_examples=4,
        batch_size=4,
        max_length=512,
    )
    module = TinyGenerator(datamodule.make_metric())
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=datamodule)
    assert datamodule.tokenizer is tokenizer
    assert len(module.losses) == 2 and all(loss == loss and loss > 0 for loss in module.losses)
    assert module.counts == [4]  # validated once, on the 4 eval questions
    assert 0.0 <= float(trainer.callback_metrics["val_accuracy"]) <= 1.0
