"""Counting what a data pipeline kept and why it dropped the rest: bad rows never crash a run and are
never trained on, and nothing is dropped silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataReport:
    """Rows kept, and rows skipped per reason, for one source."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, int] = field(default_factory=dict)  # reason -> index of the first row skipped for it

    def skip(self, reason: str, index: int | None = None) -> None:
        self.skipped[reason] += 1
        if index is not None:
            self.examples.setdefault(reason, index)

    @property
    def total(self) -> int:
        return self.kept + sum(self.skipped.values())

    def merge(self, other: DataReport) -> DataReport:
        """Fold the counts of a later stage (e.g. tokenization) into this report."""
        self.kept = other.kept
        self.skipped.update(other.skipped)
        for reason, index in other.examples.items():
            self.examples.setdefault(reason, index)
        return self

    def skipped_counts(self) -> str:
        """The skip reasons with their counts, on one line."""
        return (
            "; ".join(f"{count} skipped: {reason}" for reason, count in self.skipped.most_common())
            or "none skipped"
        )

    def summary(self) -> str:
        lines = [f"{self.source}: kept {self.kept} of {self.total} rows"]
        for reason, count in self.skipped.most_common():
            first = self.examples.get(reason)
            where = f" (first: row {first})" if first is not None else ""
            lines.append(f"  skipped {count}: {reason}{where}")
        return "\n".join(lines)
