"""The documentation builds, its examples run, and the recipe YAMLs parse and name real classes."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest
import torch
import yaml
from conftest import TOLERANCE, make_tiny_model
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning_helpers import RandomTokensData

from lit_svd import AdapterConfig, adapter_layers, adapter_state_dict, inject_adapters, trainable_parameter_count
from lit_svd.adapters import registry
from lit_svd.callbacks import SVDInit
from lit_svd.module import LitSVDAdapter

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def load_example(name: str) -> ModuleType:
    """Import ``docs/examples/<name>.py`` afresh (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lit_svd_docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- the site ------------------------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# ----- recipe configs ------------------------------------------------------------------------------------------
def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _class_paths(value)]
    return []


def _resolve(path: str):
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


def test_there_is_a_config_per_recipe():
    recipes = {p.stem for p in (REPO / "recipes").glob("*.py")}
    assert CONFIGS and recipes == {p.stem for p in CONFIGS}


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.stem)
def test_recipe_config_parses_and_names_existing_classes(config_file):
    config = yaml.safe_load(config_file.read_text())
    assert set(config) >= {"trainer", "model", "data"}, sorted(config)
    paths = _class_paths(config)
    assert "lit_svd.callbacks.SVDInit" in paths, paths
    for path in paths:
        assert isinstance(_resolve(path), type), path
    adapter = AdapterConfig(**config["model"]["adapter"])  # validates method, rank, targets, gamma …
    assert adapter.method in config_file.stem
    # The keys and types LightningCLI will see: the recipe's datamodule, LitSVDAdapter and the Trainer.
    recipe = (REPO / "recipes" / f"{config_file.stem}.py").read_text()
    data_class = _resolve("lit_svd.data." + re.search(r"run_recipe\((\w+)", recipe).group(1))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int | bool | None)
    parser.add_class_arguments(Trainer, "trainer")
    parser.add_class_arguments(LitSVDAdapter, "model")
    parser.add_class_arguments(data_class, "data")
    parsed = parser.parse_object(config)  # raises on an unknown key or a wrong type
    assert parsed.model.adapter.method == adapter.method


# ----- docs/examples/custom_module.py (docs/subclassing.md) ----------------------------------------------------
def test_custom_module_example_trains_with_its_overridden_hooks(tmp_path):
    example = load_example("custom_module")
    config = AdapterConfig(method="sorsa", rank=4, target_modules=TARGETS)
    L.seed_everything(0)
    module = example.UpperLayersSVDAdapter(
        make_tiny_model("llama"), config, first_layer=1, label_smoothing=0.1, learning_rate=1e-2
    )
    # adapter_config(): only decoder layer 1 of the 2 is adapted
    names = [name for name, _ in adapter_layers(module.model)]
    assert names and all(".layers.1." in name for name in names), names
    assert len(names) == len(TARGETS)

    calls = []
    original = module.compute_loss

    def counting(batch):
        calls.append(1)
        return original(batch)

    module.compute_loss = counting
    batch = next(iter(RandomTokensData(batch_size=4).train_dataloader()))
    batch["labels"][0, 3:8] = -100  # uneven response lengths, so per-example ≠ per-token averaging
    module.model.eval()
    with torch.no_grad():
        custom = example.UpperLayersSVDAdapter.compute_loss(module, batch)
        default = LitSVDAdapter.compute_loss(module, batch)
    assert not torch.isclose(custom, default, rtol=1e-4), (custom, default)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[SVDInit()],
    )
    before = {k: v.clone() for k, v in adapter_state_dict(module.model).items()}
    trainer.fit(module, datamodule=RandomTokensData())
    assert len(calls) == 2, "training_step must call the overridden compute_loss once per step"
    after = adapter_state_dict(module.model)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith((".U", ".S", ".V")))
    assert module.hparams["first_layer"] == 1 and module.hparams["label_smoothing"] == 0.1


def test_per_example_loss_weighs_examples_equally():
    example = load_example("custom_module")
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :4] = -100  # example 0: 1 response token, example 1: 5
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    mask = labels[:, 1:] != -100
    expected = torch.stack([per_token[i][mask[i]].mean() for i in range(2)]).mean()
    torch.testing.assert_close(example.per_example_loss(logits, labels), expected)


# ----- docs/examples/svd_scale_adapter.py (docs/adding_an_adapter.md) ------------------------------------------
@pytest.fixture
def svd_scale(monkeypatch):
    """Register the example adapter in a copy of the registry, so other tests still see the five methods."""
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    return load_example("svd_scale_adapter")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_example_adapter_keeps_the_adapter_contract(svd_scale, input_ids):
    assert "svd-scale" in registry.available_adapters()
    reference = _logits(make_tiny_model("llama"), input_ids)
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method="svd-scale", rank=4, target_modules=TARGETS))

    # init preserves the logits
    assert (_logits(model, input_ids) - reference).abs().max().item() < TOLERANCE[torch.float32]
    # trainable count = r per layer, and only the singular values train
    layers = list(adapter_layers(model))
    assert trainable_parameter_count(model) == 4 * len(layers)
    assert all(isinstance(layer, svd_scale.SVDScaleLayer) for _, layer in layers)

    # perturbing the singular values changes the logits …
    with torch.no_grad():
        for _, layer in layers:
            layer.S.mul_(1.5)
    trained = _logits(model, input_ids)
    assert (trained - reference).abs().max().item() > 1e-3
    # … and merge / unmerge round-trip (idempotent both ways)
    weights = {name: layer.base_layer.weight.clone() for name, layer in layers}
    for _, layer in layers:
        layer.merge()
        layer.merge()
    assert (_logits(model, input_ids) - trained).abs().max().item() < TOLERANCE[torch.float32]
    for name, layer in layers:
        layer.unmerge()
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
    assert (_logits(model, input_ids) - trained).abs().max().item() < TOLERANCE[torch.float32]


# ----- recipes/configs/overlays: settings layered over any recipe's own defaults ------------------------
OVERLAYS = REPO / "recipes" / "configs" / "overlays"


def _config_with_overlay(recipe: str, overlay: Path) -> dict:
    """The config ``recipes/<recipe>.py fit --config <overlay>`` resolves to (``--print_config``)."""
    done = subprocess.run(
        [sys.executable, f"recipes/{recipe}.py", "fit", "--config", str(overlay), "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize(
    ("recipe", "overlay_name", "graphs"),
    [
        ("gsm8k_sorsa", "fast_single_gpu", True),
        ("commonsense_osora", "fast_single_gpu", True),
        ("gsm8k_sorsa", "fast_7b", False),  # a 7B layer is arithmetic-bound: packed rows, no graphs
    ],
)
def test_fast_overlays_set_their_keys_and_keep_the_recipe(recipe, overlay_name, graphs):
    path = OVERLAYS / f"{overlay_name}.yaml"
    merged = _config_with_overlay(recipe, path)
    own = yaml.safe_load((REPO / "recipes" / "configs" / f"{recipe}.yaml").read_text())
    overlay = yaml.safe_load(path.read_text())
    assert merged["trainer"]["precision"] == "bf16-mixed"
    assert merged["model"]["cuda_graph_layers"] is graphs
    assert {k: merged["data"][k] for k in overlay["data"]} == overlay["data"]
    # Nested adapter keys merge: the recipe keeps its method, rank, targets …; only the storage dtype changes.
    for key, value in own["model"]["adapter"].items():
        if key != "adapter_dtype":
            assert merged["model"]["adapter"][key] == value, key
    assert merged["model"]["adapter"]["adapter_dtype"] == "float32"
    assert merged["model"]["learning_rate"] == own["model"]["learning_rate"]


def test_small_gpu_4bit_overlay_quantizes_the_base_and_keeps_the_recipe():
    merged = _config_with_overlay("gsm8k_pissa", OVERLAYS / "small_gpu_4bit.yaml")
    own = yaml.safe_load((REPO / "recipes" / "configs" / "gsm8k_pissa.yaml").read_text())
    assert merged["model"]["adapter"]["base_quantization"] == "nf4"
    assert merged["model"]["gradient_checkpointing"] is True and merged["model"]["model_dtype"] == "bfloat16"
    # compiled layers on packed rows of few shapes (padded rows recompile the layers: docs/quantization.md)
    assert merged["model"]["compile"] is True
    assert merged["data"]["pack_sequences"] is True and merged["data"]["pack_to_multiple_of"] == 256
    for key, value in own["model"]["adapter"].items():  # method, rank, targets … unchanged: PiSSA → QPiSSA
        assert merged["model"]["adapter"][key] == value, key


# ----- learning rates: the recipes ship the study's tuned values -------------------------------------------------
# Row labels of the second grid table (the rest of the family) → method names; PEFT's MiCA is not ours.
FAMILY_GRID_LABELS = {
    "DoRA": "dora", "VeRA": "vera", "MiLoRA": "milora", "CorDA (IPM)": "corda", "EVA": "eva", "LoRA-GA": "loraga",
    "LoftQ (NF4)": "loftq",
}  # fmt: skip


def _grid_best_learning_rates() -> dict[str, float]:
    """Method → the bold (best) learning rate of the grid tables in docs/reproduction.md (ours only)."""
    lines = (REPO / "docs" / "reproduction.md").read_text().splitlines()
    best = {}
    for header in ("| method | 5e-05 |", "| method | 2e-5 |"):
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        rates = [cell.strip() for cell in lines[start].strip("|").split("|")][1:]
        for line in lines[start + 2 :]:
            if not line.startswith("|"):
                break  # the end of the grid table
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if cells[0].startswith("ours "):
                method = cells[0].split()[1].lower()  # "ours SORSA (γ 4e-4)" → "sorsa"
            elif cells[0] in FAMILY_GRID_LABELS:
                method = FAMILY_GRID_LABELS[cells[0]]
            else:
                continue
            (column,) = [i for i, cell in enumerate(cells[1:]) if cell.startswith("**")]
            best[method] = float(rates[column])
    return best


def test_grid_table_is_read():
    assert _grid_best_learning_rates() == {
        "lora": 5e-3, "pissa": 1e-3, "olora": 5e-4, "sorsa": 2e-4, "osora": 2e-2,
        "dora": 5e-3, "vera": 1e-1, "milora": 5e-3, "corda": 1e-4, "eva": 5e-3, "loraga": 5e-3, "loftq": 5e-3,
    }  # fmt: skip


# Methods not in the study's grid yet: their recipes borrow the tuned rate of the nearest studied method.
UNTUNED: dict[str, str] = {}


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.stem)
def test_recipe_learning_rate_is_the_studys_tuned_value(config_file):
    config = yaml.safe_load(config_file.read_text())
    method = config["model"]["adapter"]["method"]
    tuned = _grid_best_learning_rates()
    assert (method in tuned) != (method in UNTUNED), f"{method}: tuned in the grid, or listed in UNTUNED"
    assert config["model"]["learning_rate"] == tuned[UNTUNED.get(method, method)]
    # the study script's default (used when no grid is given) is the same value
    study = (REPO / "recipes" / "studies" / "gsm8k_methods.py").read_text()
    defaults = re.search(r"^DEFAULT_LR = (\{.*?\})", study, re.MULTILINE | re.DOTALL).group(1)
    assert float(re.search(rf'"{method}": ([0-9.e-]+)', defaults).group(1)) == config["model"]["learning_rate"]
    # and the README's recipe table says so
    row = next(line for line in README.splitlines() if line.startswith(f"| `{config_file.stem}` |"))
    assert float(row.split("|")[2]) == config["model"]["learning_rate"]


# ----- the README: first screen, offline commands ---------------------------------------------------------------
README = (REPO / "README.md").read_text()


def test_readme_first_screen_has_install_tests_and_the_main_job():
    first_screen = "\n".join(README.splitlines()[:24])
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in first_screen
    assert "pip install torch==2.13.0" in first_screen  # this environment's pinned local wheel
    assert 'pip install -e ".[dev]"' in first_screen
    assert "python -m pytest -q" in first_screen
    assert "lightning run recipes/gsm8k_sorsa.py --data.data_dir ../shared/data/gsm8k" in first_screen


def _readme_commands() -> dict[str, list[str]]:
    """Recipe → the arguments of its offline command in the README (continuation lines joined)."""
    import shlex

    text = README.replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        match = re.search(r"lightning run recipes/(\w+)\.py ([^`|]*)", line)
        if match and "../shared/data" in line and match.group(1) not in commands:
            commands[match.group(1)] = shlex.split(match.group(2))
    return commands


def test_every_recipe_has_an_offline_command_in_the_readme_whose_paths_exist(tmp_path):
    from jsonargparse import Namespace

    from lit_svd.cli import check_paths

    commands = _readme_commands()
    assert set(commands) == {p.stem for p in CONFIGS}
    for recipe, args in commands.items():
        values = dict(zip(args[::2], args[1::2], strict=True))
        data = {}
        for flag, value in values.items():
            value = yaml.safe_load(value) if value.startswith("[") else value
            if isinstance(value, str) and value.startswith("runs/metamathqa_standin"):
                value = str(tmp_path)  # made by recipes/tools/gsm8k_as_metamathqa.py, as the README says
                (tmp_path / "MetaMathQA-395K.json").write_text("[]")
            elif isinstance(value, str) and value.startswith("../"):
                value = str(REPO / value)
            data[flag.removeprefix("--data.")] = value
        config = yaml.safe_load((REPO / "recipes" / "configs" / f"{recipe}.yaml").read_text())
        merged = {**config["data"], **data}
        if recipe.startswith("metamath"):
            merged["train_file"] = "MetaMathQA-395K.json"
        parsed = Namespace(model=Namespace(model=config["model"]["model"]), data=Namespace(**merged), ckpt_path=None)
        assert check_paths(parsed, "fit") == [], recipe
