"""Generated tasks that test the mechanism Bitune relies on: information that a causal read of the prompt
gets only late.

- ``find_once``: a list of nine items, four pairs and one singleton, shuffled; "Which item appears only
  once?". Read causally, the first copy of a pair cannot know that it has a twin further on, so a causal
  representation of the list marks the singleton no differently than the first copies of the pairs; read
  bidirectionally, every copy can see its twin.
- ``find_twice``, the control: one pair among seven singletons; "Which item appears twice?". Here the second
  copy can mark itself causally (it has seen the first), so a causal read suffices.

Both are multiple choice over the list's distinct items (five and eight choices). ``find_once_long`` and
``find_twice_long`` are the same with 25 items (twelve pairs and a singleton: 13 choices; one pair among 23
singletons: 24 choices), for a model that the nine-item lists leave at their ceiling. The rows are generated
from fixed seeds by this module (2,000 train and 1,000 eval questions per task; a train question that is
also an eval question is removed when the task is loaded), so every machine gets the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ITEMS = (
    "apple", "bird", "boat", "book", "bread", "chair", "cloud", "coat", "cup", "desk", "dog", "door",
    "egg", "fish", "flower", "fork", "frog", "glass", "hat", "horse", "house", "key", "lamp", "leaf",
    "lion", "moon", "mouse", "pen", "pig", "plate", "rain", "ring", "river", "rock", "rose", "salt",
    "sheep", "ship", "shoe", "snow", "sock", "spoon", "star", "stone", "sun", "table", "tree", "wall",
)  # fmt: skip
SIZES = {"train": 2000, "eval": 1000}
SEEDS = {"train": 1, "eval": 2}
ONCE, TWICE = "Which item appears only once?", "Which item appears twice?"
# task -> (question, number of distinct items): find_once lists all but one of them twice, find_twice one
TASKS = {
    "find_once": (ONCE, 5),
    "find_twice": (TWICE, 8),
    "find_once_long": (ONCE, 13),
    "find_twice_long": (TWICE, 24),
}


def generate(task: str, split: str) -> Iterator[dict]:
    """The rows of a generated task's split: ``{"question", "choices", "label"}``.

    Raises:
        ValueError: for an unknown task or split.
    """
    if task not in TASKS or split not in SIZES:
        raise ValueError(
            f"no generated data for {task!r}/{split!r}; tasks {sorted(TASKS)}, splits {sorted(SIZES)}"
        )
    question, count = TASKS[task]
    generator = random.Random(f"{task}/{SEEDS[split]}")
    for _ in range(SIZES[split]):
        distinct = generator.sample(ITEMS, count)
        answer = distinct[0]
        # find_once: the others in pairs, the answer once; find_twice: the answer a pair among singletons
        listed = [*distinct[1:], *distinct[1:], answer] if question == ONCE else [*distinct, answer]
        generator.shuffle(listed)
        choices = sorted(distinct)
        yield {
            "question": f"{question} {', '.join(listed)}",
            "choices": choices,
            "label": choices.index(answer),
        }
