"""PNG plots of the same curves, with matplotlib (the `dev` extra), for pasting into notes."""

from __future__ import annotations

from pathlib import Path

from looprl.report.charts import Points


def write_pngs(out_dir: Path, figures: dict[str, dict[str, dict[str, Points]]]) -> list[str]:
    """One PNG per figure (`{file stem: {panel title: {line label: points}}}`), a grid of
    panels each; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    names = []
    for stem, panels in figures.items():
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
        for ax, (title, lines) in zip(axes.flat, panels.items()):
            for label, pts in lines.items():
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="." if len(pts) < 30 else None, label=label)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            if len(lines) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        name = f"{stem}.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names
