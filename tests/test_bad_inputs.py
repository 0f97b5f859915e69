"""Bad input, class by class: one clear line on stderr, exit status 2 (bad input) or 1 (failure during
work), and nothing written or lost. Each row is a (command line, expected status, expected message) case,
run through `bitune.cli.main` in this process; the Python API raises the same errors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bitune import BituneConfig, BituneModel, get_bitune_model
from bitune.cli import main
from bitune.data import load_examples
from bitune.references import load_model
from bitune.training.run_config import load_run_config

from conftest import tiny_model, tiny_run_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a data file, a valid run config and a saved tiny Bitune model (read-only for the cases)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir, data_file = tiny_run_files(root)
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 64},
        "training": {
            "max_steps": 2,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "report_to": ["none"],
        },
    }
    (root / "good.yaml").write_text(json.dumps(config))
    base, _ = load_model(str(model_dir))
    get_bitune_model(base, BituneConfig()).save_pretrained(root / "saved")
    return root


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err[-1] if err else ""


def digest(folder: Path) -> str:
    """A hash of every file under ``folder`` (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- configs (bitune train)
def yaml_file(text: str):
    return lambda root, out: _write(root / "case.yaml", text)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def good(root: Path, out: Path) -> str:
    return str(root / "good.yaml")


TRAIN_CASES = {
    "yaml syntax": (yaml_file("training: [1\n"), [], r"is not valid YAML: .*line 2"),
    "tab indentation": (
        yaml_file("training:\n\tseed: 1\n"),
        [],
        r"is not valid YAML: .*cannot start any token",
    ),
    "duplicate keys": (yaml_file("model: {}\nmodel: {}\n"), [], r"is not valid YAML: found duplicate key"),
    "top-level list": (yaml_file("- model\n- data\n"), [], r"must hold a mapping of sections"),
    "empty file": (yaml_file("# nothing\n"), [], r"is empty; start from a config in configs/"),
    "missing file": (
        lambda root, out: str(root / "nope.yaml"),
        [],
        r"config file .*nope\.yaml does not exist",
    ),
    "unbalanced [ in override": (
        good,
        ["training.report_to=[none"],
        r"invalid override 'training.report_to=\[none'",
    ),
    "override without =": (good, ["training.seed"], r"overrides must look like key=value"),
    "unknown key": (good, ["training.lr=1"], r"invalid config.*Key 'lr' not in 'TrainingSection'"),
    "huge learning rate": (good, ["training.learning_rate=1e6"], r"learning_rate must be a finite number in"),
    "infinite learning rate": (
        good,
        ["training.learning_rate=.inf"],
        r"learning_rate must be a finite number",
    ),
    "nan learning rate": (good, ["training.learning_rate=.nan"], r"learning_rate must be a finite number"),
    "negative workers": (
        good,
        ["training.dataloader_num_workers=-1"],
        r"dataloader_num_workers must be >= 0",
    ),
    "unknown report_to": (
        good,
        ["training.report_to=[bogus]"],
        r"report_to names unknown integrations \['bogus'\]",
    ),
    "negative LoRA rank": (
        good,
        ["bitune.peft={peft_type: LORA, r: -3, target_modules: all-linear}"],
        r"peft_config\.r must be an integer >= 1, got -3",
    ),
    "alpha_init 1": (good, ["bitune.alpha_init=1"], r"alpha_init must be a number in \(0, 1\)"),
    "missing data file": (good, ["data.train=/no/such.jsonl"], r"data\.train is neither a task"),
    "missing model path": (
        good,
        ["model.name=/no/such/model"],
        r"model directory '/no/such/model' does not exist",
    ),
    "a file as model": (good, ["model.name=FILE"], r"is a file; give the directory"),
    "bad config.json": (good, ["model.name=BADCONFIG"], r"could not load the model in .*badconfig"),
    "truncated safetensors": (good, ["model.name=TRUNCATED"], r"could not load the model in .*truncated"),
    "offline hub id": (good, ["model.name=no-such-org/no-such-model"], r"could not load model .* hub id"),
    "batch size 0": (good, ["training.batch_size=0"], r"training\.batch_size must be > 0"),
    "ShareGPT turns whose 'from' is a list or an object": (
        good,
        ["data.train=SHAREGPT"],
        r"none of its 2 rows could be used \(2 skipped: a turn's 'from' is not one of",
    ),
}


def broken_models(root: Path) -> dict[str, str]:
    """Model directories that do not load, made once: a file, a bad config.json, truncated weights."""
    made = {"FILE": root / "data.jsonl"}
    bad = root / "badconfig"
    if not bad.exists():
        tiny_model("llama").save_pretrained(bad)
        (bad / "config.json").write_text("{not json")
    truncated = root / "truncated"
    if not truncated.exists():
        tiny_model("llama").save_pretrained(truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    made.update(BADCONFIG=bad, TRUNCATED=truncated, SHAREGPT=root / "sharegpt.jsonl")
    (root / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    turns = [
        [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "yo"}],
        [{"from": {"a": 1}, "value": "hi"}],
    ]
    (root / "sharegpt.jsonl").write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    return {k: str(v) for k, v in made.items()}


def _replace(override: str, replacements: dict[str, str]) -> str:
    key, _, value = override.partition("=")
    return f"{key}={replacements[value]}" if value in replacements else override


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_inputs(case, files, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when the library loads
    make_config, overrides, message = TRAIN_CASES[case]
    replacements = broken_models(tmp_path)
    overrides = [_replace(o, replacements) for o in overrides]
    out = tmp_path / "run"
    status, line = run(["train", make_config(files, out), *overrides, f"training.output_dir={out}"], capsys)
    assert status == 2, line
    assert line.startswith("bitune train: error: ") and "Traceback" not in line
    assert re.search(message, line), line
    assert not out.exists()  # nothing written


def test_the_python_api_raises_the_same_errors(files):
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        load_run_config(files / "good.yaml", ["training.learning_rate=.inf"])
    with pytest.raises(ValueError, match="does not exist"):
        load_model("/no/such/model")


# --------------------------------------------------------------------------------- compare configs
COMPARE_CASES = {
    "methods as a list": ({"methods": ["lora", "bitune"]}, r"invalid config"),
    "method name with ..": (
        {"methods": {"../../escaped": {}}},
        r"method name '\.\./\.\./escaped' is not a plain folder name",
    ),
    "evaluation.limit 0": ({"evaluation": {"limit": 0}}, r"evaluation\.limit must be >= 1"),
    "duplicate seeds": ({"seeds": [1, 1]}, r"seeds must be distinct"),
    "unknown task": ({"tasks": ["nope"]}, r"tasks: no evaluation task 'nope'"),
}


@pytest.mark.parametrize("case", list(COMPARE_CASES))
def test_bad_compare_configs(case, files, tmp_path, capsys):
    change, message = COMPARE_CASES[case]
    config = {
        "output_dir": str(tmp_path / "grid"),
        "run": json.loads((files / "good.yaml").read_text()),
        "methods": {"lora": {"bitune.variant": "lora"}},
        "evaluation": {"tasks": ["arc_easy"], "limit": 2},
        **change,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(config))
    status, line = run(["compare", str(path)], capsys)
    assert status == 2 and re.search(message, line), line
    assert not (tmp_path / "grid").exists() and not (tmp_path / "escaped").exists()


# ------------------------------------------------------------------------------- saved models (bitune eval)
def damage(kind: str, saved: Path, target: Path) -> None:
    import shutil

    shutil.copytree(saved, target)
    meta_path = target / "bitune_config.json"
    meta = json.loads(meta_path.read_text())
    if kind == "config is a list":
        meta_path.write_text("[1, 2]")
    elif kind == "../ in the adapter list":
        meta["adapters"] = ["../../etc"]
        meta_path.write_text(json.dumps(meta))
    elif kind == "garbage safetensors":
        (target / "causal" / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    elif kind == "adapters of the wrong size":
        path = target / "causal" / "adapter_model.safetensors"
        from safetensors.torch import load_file

        save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(path).items()}, path)
    elif kind == "NaN thetas":
        save_file(
            {"theta_k": torch.full((3,), float("nan")), "theta_v": torch.zeros(3)},
            target / "mixing.safetensors",
        )
    elif kind == "modules_to_save":
        adapter = json.loads((target / "causal" / "adapter_config.json").read_text())
        adapter["modules_to_save"] = ["lm_head"]
        (target / "causal" / "adapter_config.json").write_text(json.dumps(adapter))


SAVED_CASES = {
    "config is a list": r"format_version",
    "../ in the adapter list": r"is damaged: it needs .*'adapters' among \['causal', 'bidir'\]",
    "garbage safetensors": r"cannot read saved weights",
    "adapters of the wrong size": r"adapter 'causal': the saved weights do not fit",
    "NaN thetas": r"theta_k has non-finite values",
    "modules_to_save": r"trains whole modules \(modules_to_save\)",
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_damaged_saved_models_are_refused(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "damaged"
    damage(case, files / "saved", target)
    before = digest(target)
    status, line = run(["eval", str(target), "--tasks", "arc_easy", "--limit", "2"], capsys)
    assert status == 2 and re.search(SAVED_CASES[case], line), line
    assert digest(target) == before and not (target / "eval").exists()  # nothing lost, nothing written
    with pytest.raises(ValueError, match=SAVED_CASES[case]):  # the same error from Python
        BituneModel.from_pretrained(tiny_model("llama"), target)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "smollm2-135m-instruct", "--batch-size", "-1"], r"--batch-size: must be >= 1, got -1"),
        (["eval", "smollm2-135m-instruct", "--limit", "0"], r"--limit: must be >= 1, got 0"),
        (["eval", "smollm2-135m-instruct", "--tasks", "nope"], r"no evaluation task 'nope'"),
        (["train"], r"the following arguments are required: config"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, line = run(argv, capsys)
    assert status == 2 and re.search(message, line), line
    assert not (tmp_path / "runs").exists()


# -------------------------------------------------------------------------------------- data rows
def test_bad_rows_are_skipped_and_counted_not_raised(tmp_path):
    path = tmp_path / "rows.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        "\ufeff" + json.dumps({"prompt": "first row after a BOM", "completion": "kept"}),
        json.dumps({"instruction": "an alpaca row", "output": "kept"}),
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "kept"}]}
        ),
        '{"prompt": "lone \\ud800 surrogate", "completion": "x"}',
        deep,
        json.dumps({"prompt": "last", "completion": "kept"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, report = load_examples(path)
    answers = [e.completion if hasattr(e, "completion") else e.messages[-1]["content"] for e in examples]
    assert answers == ["kept"] * 4  # mixed formats: no row lost to the first's
    assert report.skipped == {
        "field 'prompt' is not valid Unicode text (a lone surrogate)": 1,
        "line is not valid JSON (or nested too deeply)": 1,
    }


def test_a_chosen_format_that_most_rows_do_not_fit_is_refused_with_counts(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(4)] + [{"prompt": "p", "completion": "c"}]
    with pytest.raises(ValueError, match=r"only 1 of 5 rows fit the chosen format 'prompt_completion'"):
        load_examples(rows, fmt="prompt_completion")
