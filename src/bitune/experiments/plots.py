"""The paper's figures as PNG files (matplotlib): the bidirectional-to-causal ratio over training steps
(Figure 2), the final ratio per layer for K and V (Figure 3), and loss curves. Plain data in, files out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Series = Sequence[tuple[float, float]]  # (step, value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    series: dict[str, Series], path: str | Path, title: str, ylabel: str, xlabel: str = "training step"
) -> Path:
    """One line per label; saves a PNG to ``path`` and returns it."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, label=label)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.grid(alpha=0.3)
    if series:
        axis.legend()
    return _save(plt, figure, path)


def plot_ratio_per_layer(
    alpha_k: Sequence[float], alpha_v: Sequence[float], path: str | Path, title: str
) -> Path:
    """Figure 3: the final bidirectional-to-causal ratio of every layer, for keys and values."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, values, name in zip(axes, (alpha_k, alpha_v), ("Bidir. K", "Bidir. V"), strict=True):
        axis.bar(range(len(values)), [100 * v for v in values])
        axis.set(title=name, xlabel="layer index")
        axis.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("ratio [%]")
    figure.suptitle(title)
    return _save(plt, figure, path)


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


Band = Sequence[tuple[float, float, float]]  # (step, mean, std)


def plot_bands(panels: Sequence[tuple[str, str, dict[str, Band]]], path: str | Path, title: str) -> Path:
    """Side-by-side panels, each ``(title, ylabel, {label: [(step, mean, std), ...]})``: a line per label
    with a shaded mean ± std band; saves a PNG to ``path`` and returns it. A method keeps its colour in
    every panel; labels ``"<method> K"`` and ``"<method> V"`` take the method's colour (V dashed)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = list(axes) if len(panels) > 1 else [axes]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    for axis, (panel_title, ylabel, series) in zip(axes, panels, strict=True):
        for label, points in series.items():
            if not points:
                continue
            method = label.removesuffix(" K").removesuffix(" V")
            colour = colours.setdefault(method, cycle[len(colours) % len(cycle)])
            steps, means, stds = zip(*points, strict=True)
            (line,) = axis.plot(
                steps,
                means,
                marker="o" if len(steps) < 12 else None,
                ms=3,
                label=label,
                color=colour,
                linestyle="--" if label.endswith(" V") else "-",
            )
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        axis.set(title=panel_title, xlabel="updates", ylabel=ylabel)
        axis.grid(alpha=0.3)
        if any(series.values()):
            axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(plt, figure, path)
