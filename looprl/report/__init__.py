"""`looprl report RUN`: one self-contained HTML page of a run folder (curves, evaluation table,
config, trajectory viewer), and PNG plots beside it where matplotlib is installed.

It reads the run's files only (`config.yaml`, `metrics.jsonl`, `results.json`, `eval/`), so it
works on a finished run, a run still training, or a copy of one on a machine without torch.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from looprl.report.charts import Points, eval_curves, is_constant, training_groups
from looprl.report.page import render_page
from looprl.report.png import write_pngs
from looprl.report.run import RunFiles, load_run

__all__ = ["Report", "RunFiles", "load_run", "write_report"]


@dataclass
class Report:
    """What `write_report` wrote: the page, and the PNGs (none without matplotlib)."""

    page: Path
    pngs: list[Path]
    png_note: str = ""


def write_report(run_dir: str | Path, out: str | Path | None = None, *, pngs: bool = True) -> Report:
    """Write `out/index.html` (default `run_dir/report/`) and, with `pngs` and matplotlib
    installed, `training.png` and `heldout.png` beside it.

    Raises:
        FileNotFoundError, ValueError: `run_dir` is not a run folder.
    """
    run = load_run(run_dir)
    out_dir = Path(out) if out is not None else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    names, note = [], ""
    if not pngs:
        note = "PNGs not asked for"
    elif importlib.util.find_spec("matplotlib") is None:
        note = "no PNGs: matplotlib is not installed (pip install matplotlib, or the dev extra)"
    else:
        names = write_pngs(out_dir, _figures(run))
    page = out_dir / "index.html"
    page.write_text(render_page(run, names))
    return Report(page=page, pngs=[out_dir / n for n in names], png_note=note)


def _figures(run: RunFiles) -> dict[str, dict[str, dict[str, Points]]]:
    """The PNGs: one per training group and one of the held-out curves; constant panels left out."""
    figures = {re.sub(r"\W", "_", f"training_{group}"): {key.rpartition("/")[2]: {key: pts} for key, pts in series.items()}
               for group, series in training_groups(run.metrics).items()}
    figures["heldout"] = eval_curves(run.metrics)
    moving = {stem: {t: lines for t, lines in panels.items() if not all(is_constant(p) for p in lines.values())}
              for stem, panels in figures.items()}
    return {stem: panels for stem, panels in moving.items() if panels}
