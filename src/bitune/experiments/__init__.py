"""Comparisons: a grid of methods x seeds (x tasks), trained with the same data, budget and learning rate,
evaluated on the same held-out tasks, summarised like the paper's tables and figures.

    bitune compare configs/quickstart.yaml

- config.py: the compare config (methods as overrides of one run config, seeds, tasks, evaluation,
  budget-curve steps) and what identifies a run's result (its fingerprint);
- record.py: the report (``results.json``), which keeps every finished run's scores with its fingerprint,
  commit, command and wall time, so a grid continues from a committed report on another machine;
- runner.py: trains and scores what is not finished yet, writing the report after every run;
- tables.py and figures.py: markdown/CSV tables and PNG plots (the paper's Figures 2-3, loss, budget curve).
"""

from .config import CompareConfig, load_compare_config
from .runner import run_grid

__all__ = ["CompareConfig", "load_compare_config", "run_grid"]
