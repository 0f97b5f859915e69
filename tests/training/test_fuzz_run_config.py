"""Fuzzed run configs: arbitrary YAML scalars, lists and maps at every key of the schema. Loading gives a
valid config or one clear input error naming what is wrong; nothing else escapes."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bitune.errors import INPUT_ERRORS
from bitune.training.run_config import RunConfig, load_run_config

from conftest import count_fuzz_example

KEYS = [
    (section.name, f.name)
    for section in dataclasses.fields(RunConfig)
    for f in dataclasses.fields(section.default_factory())
] + [("training", "no_such_field"), ("nonsense", "x")]
YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["arc_easy", "lora", "bitune", "cloze", "auto", "LORA", "-1", "1e-3", "[]", "{}"]),
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["peft_type", "r", "a", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), YAML_VALUES), min_size=1, max_size=3))
def test_any_value_at_any_key_gives_a_config_or_a_clear_error(tmp_path_factory, entries):
    count_fuzz_example("run configs (1-3 fuzzed keys each)")
    config: dict = {}
    for (section, name), value in entries:
        config.setdefault(section, {})[name] = value
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    try:
        loaded = load_run_config(path)
    except INPUT_ERRORS as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        return
    assert isinstance(loaded, RunConfig)
    loaded.bitune_config()  # a valid config builds its method's config
