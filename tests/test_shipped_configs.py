"""Every shipped config loads and validates, opens with the command that runs it, and the paper's
configs are what their generator writes."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest
import yaml

from bitune.experiments import load_compare_config
from bitune.training.run_config import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(p for p in (CONFIGS / "paper").rglob("*.yaml") if "compare" not in p.parts)
PAPER_GRIDS = sorted((CONFIGS / "paper" / "compare").glob("*.yaml"))
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_paper_configs_validate_and_say_how_to_run(path):
    config = load_run_config(path)
    assert path.read_text().startswith(f"# bitune train configs/{path.relative_to(CONFIGS)}\n")
    assert config.data.source == "hub" and config.training.gradient_accumulation_steps == 10


def test_paper_configs_cover_the_papers_tables():
    names = {str(p.relative_to(CONFIGS / "paper")) for p in PAPER}
    assert len([n for n in names if n.startswith("instruct/")]) == 5 * 3  # Table 1: 5 models x 3 methods
    assert len([n for n in names if n.startswith("downstream/")]) == 5 * 5 * 2  # Table 2
    assert len([n for n in names if n.startswith("ablations/")]) == 2 * 7  # Tables 3 and 5
    assert len([n for n in names if n.startswith("peft/")]) == 2 * 4  # Table 4
    gemma = load_run_config(CONFIGS / "paper/downstream/arc_challenge/gemma-7b/bitune.yaml")
    assert (gemma.training.learning_rate, gemma.training.max_steps) == (3e-4, 555)  # Tables 8 and 9
    ia3 = load_run_config(CONFIGS / "paper/peft/llama3-8b/bitune_ia3.yaml")
    assert ia3.training.learning_rate == 1e-3 and ia3.bitune.peft["peft_type"] == "IA3"


def test_paper_configs_are_up_to_date_with_their_generator():
    spec = importlib.util.spec_from_file_location("generate", CONFIGS / "paper" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    expected = {**generate.files(), **generate.compare_files()}
    assert {str(p.relative_to(CONFIGS / "paper")) for p in PAPER + PAPER_GRIDS} == set(expected)
    for path, config in expected.items():
        assert (CONFIGS / "paper" / path).read_text() == generate.render(path, config), path


@pytest.mark.parametrize("path", PAPER_GRIDS, ids=lambda p: p.name)
def test_paper_grids_validate_and_say_how_to_run(path):
    config = load_compare_config(path)
    assert path.read_text().startswith(f"# bitune compare configs/paper/compare/{path.name}\n")
    assert config.seeds == [42, 43, 44] and config.evaluation.source == "hub"
    if path.name.startswith("table2"):  # downstream: the paper's steps per task (Table 8)
        assert config.run_config("bitune", 42, "arc_challenge").training.max_steps == 555
        assert config.run_config("lora", 43, "siqa").training.max_steps == 3341
    if path.name.startswith("table4"):  # IA3 at its own learning rate (Table 9)
        assert config.run_config("bitune_ia3", 42).training.learning_rate == 1e-3


@pytest.mark.parametrize("path", sorted((CONFIGS / "replication").glob("*.yaml")), ids=lambda p: p.name)
def test_replication_configs_validate_and_say_how_to_run(path):
    config = load_compare_config(path)
    assert path.read_text().startswith(f"# bitune compare configs/replication/{path.name} ")
    assert config.tasks and config.seeds and config.report_dir.startswith("results/replication/")
    if path.name != "untrained.yaml":  # there the seed cannot change the (untrained) model
        assert len(config.seeds) == 3  # the paper's seeds, for every comparison


@pytest.mark.parametrize("path", sorted((CONFIGS / "evidence").glob("*.yaml")), ids=lambda p: p.name)
def test_evidence_configs_follow_the_papers_recipe_and_say_how_to_run(path):
    config = load_compare_config(path)
    assert path.read_text().startswith(f"# bitune compare configs/evidence/{path.name} ")
    if config.report_dir == f"results/evidence/{path.stem}":
        assert config.seeds == [42, 43, 44]
    else:  # part of another grid, run first: its runs must be that grid's runs
        grid = load_compare_config(CONFIGS / "evidence" / f"{Path(config.report_dir).name}.yaml")
        assert set(config.seeds) < set(grid.seeds) and set(config.methods) < set(grid.methods)
        scoring = dataclasses.replace(config.evaluation, baseline=grid.evaluation.baseline)  # a subset's own
        assert (config.output_dir, config.tasks, scoring) == (grid.output_dir, grid.tasks, grid.evaluation)
        for run in itertools.product(config.methods, config.seeds, config.grid_tasks):
            assert config.run_config(*run) == grid.run_config(*run)
    assert config.evaluation.limit is None or config.evaluation.limit >= 500
    for task in config.grid_tasks:
        for method in config.methods:
            if config.is_trained(method):
                training = config.run_config(method, 42, task).training
                assert training.batch_size * training.gradient_accumulation_steps == 10
                assert training.learning_rate == 1e-3 and training.max_steps == -1
                assert training.num_epochs == (5 if task == "arc_challenge" else 1)  # paper Table 8


def test_the_chat_config_validates_and_its_data_ships_in_the_repository():
    config = load_run_config(CONFIGS / "chat.yaml")
    assert (CONFIGS / "chat.yaml").read_text().startswith("# bitune train configs/chat.yaml ")
    assert (config.data.template, config.data.turns) == ("chat", "all")
    from bitune.data import Conversation, load_examples

    examples, report = load_examples(CONFIGS.parent / config.data.train)
    assert len(examples) == 40 and not report.skipped
    assert all(isinstance(e, Conversation) and len(e.assistant_turns) == 2 for e in examples)


def test_quickstart_validates_and_says_how_to_run():
    config = load_compare_config(CONFIGS / "quickstart.yaml")
    assert set(config.methods) == {"pretrained", "lora", "bitune"}
    assert config.run_config("bitune", 42).model.name == "smollm2-135m-instruct"
    assert (CONFIGS / "quickstart.yaml").read_text().startswith("# bitune compare configs/quickstart.yaml")


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} ")
    config = load_config_from_file(str(path))
    assert (
        config.num_processes >= 2
        and config.distributed_type.name == yaml.safe_load(path.read_text())["distributed_type"]
    )
