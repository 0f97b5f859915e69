"""Hypothesis strategies shared by the fuzz tests: arbitrary JSON, and rows or messages shaped like the data
formats with arbitrary JSON in every field."""

from __future__ import annotations

from hypothesis import strategies as st

# text with the characters that break things: control characters, lone surrogates, template markers
TEXT = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=20),
    st.sampled_from(
        ["", " ", "\n", "<|im_start|>", "<|im_end|>", "\ud800", "system", "user", "gpt", "human"]
    ),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "developer"]) | JSON
MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": ROLES, "content": JSON | TEXT, "from": ROLES, "value": JSON | TEXT}
)
MESSAGES = st.lists(MESSAGE, max_size=5) | JSON
KEYS = ("prompt", "completion", "response", "output", "instruction", "input", "messages", "conversations")
ROW = (
    st.fixed_dictionaries(
        {},
        optional={
            key: (MESSAGES if key in ("messages", "conversations", "prompt", "completion") else JSON | TEXT)
            for key in KEYS
        },
    )
    | JSON
)
