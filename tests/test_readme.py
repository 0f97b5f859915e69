"""The README describes the code as it is: every BituneConfig field in its table, and its Layout section
naming every module of the package."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bitune import BituneConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_bitune_config_table_lists_every_field():
    text = section("The method and its variants")
    table = text[text.index("| field | values | default |") :].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(BituneConfig)]


def test_the_layout_names_every_module_and_folder():
    layout = section("Layout")
    package = REPO / "src" / "bitune"
    names = {
        p.name for p in package.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")
    }
    names |= {p.name for p in package.glob("*/*.py") if not p.name.startswith("_")}
    names -= {"lm_eval_tasks", "bitune.egg-info"}
    missing = sorted(n for n in names if n.removesuffix(".py") not in layout)
    assert not missing, f"README's Layout does not mention {missing}"
