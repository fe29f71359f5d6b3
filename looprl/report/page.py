"""The report page: one self-contained HTML file (inline CSS, JS and SVG; nothing fetched)."""

from __future__ import annotations

import json
from html import escape
from importlib.resources import files
from typing import Any

from looprl.report.charts import Points, eval_curves, is_constant, line_chart, training_groups
from looprl.report.run import RunFiles
from looprl.report.tables import episodes, eval_rows


def render_page(run: RunFiles, pngs: list[str] = ()) -> str:
    """The whole page for `run`; `pngs` (file names beside it) are linked at the end."""
    assets = files("looprl.report") / "assets"
    data = json.dumps({"episodes": episodes(run)}).replace("<", "\\u003c")  # no `</script>` inside the JSON
    body = "".join([
        _header(run),
        _section("Training curves", _training(run), "training"),
        _section("Held-out curves", _held_out(run), "heldout"),
        _section("Evaluation", _eval_table(run), "evaluation"),
        _section("Trajectories", _viewer(), "trajectories"),
        _section("Config", f"<pre class='config'>{escape(run.config_text)}</pre>", "config"),
        _section("Plots", " · ".join(f"<a href='{escape(p)}'>{escape(p)}</a>" for p in pngs), "plots") if pngs else "",
    ])
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>looprl report: {escape(run.path.name)}</title>"
            f"<style>{(assets / 'report.css').read_text()}</style></head><body>{body}"
            f"<script type='application/json' id='report-data'>{data}</script>"
            f"<script>{(assets / 'report.js').read_text()}</script></body></html>")


def _section(title: str, content: str, anchor: str) -> str:
    return f"<section id='{anchor}'><h2>{escape(title)}</h2>{content}</section>"


def _header(run: RunFiles) -> str:
    steps = max((r["step"] for r in run.metrics), default=0)
    facts = [f"{steps} steps", escape(str(run.path))]
    if sft := run.results.get("sft"):
        facts.append(f"SFT warm start: {sft.get('steps')} steps, loss {sft.get('loss', float('nan')):.3g}")
    for mode, change in run.results.get("change", {}).items():
        facts.append(f"{escape(mode)}: {100 * change['before']:.1f}% → {100 * change['after']:.1f}% "
                     f"({100 * change['change']:+.1f} pts, {change['gained']} gained, {change['lost']} lost, "
                     f"sign test p = {change['p_value']:.2g})")
    nav = " ".join(f"<a href='#{a}'>{t}</a>" for a, t in (("training", "training"), ("heldout", "held-out"),
                   ("evaluation", "evaluation"), ("trajectories", "trajectories"), ("config", "config")))
    return (f"<header><h1>looprl report: {escape(run.path.name)}</h1><p class='facts'>{' · '.join(facts)}</p>"
            f"<nav>{nav}</nav></header>")


def _training(run: RunFiles) -> str:
    groups = training_groups(run.metrics)
    if not groups:
        return "<p class='empty'>No training steps logged yet.</p>"
    return "".join(f"<h3>{escape(group)}</h3>" + _charts({key.rpartition("/")[2]: {key: pts} for key, pts in series.items()})
                   for group, series in groups.items())


def _held_out(run: RunFiles) -> str:
    curves = eval_curves(run.metrics)
    if not curves:
        return "<p class='empty'>No held-out evaluation logged.</p>"
    return _charts(curves)


def _charts(panels: dict[str, dict[str, Points]]) -> str:
    """A chart per panel (title -> lines); panels whose every line is constant are listed instead."""
    moving = {t: lines for t, lines in panels.items() if not all(is_constant(p) for p in lines.values())}
    still = [escape(t) + " = " + ", ".join(f"{pts[0][1]:.4g}" + (f" ({label})" if len(lines) > 1 else "")
                                          for label, pts in lines.items())
             for t, lines in panels.items() if t not in moving]
    charts = "".join(line_chart(title, lines) for title, lines in moving.items())
    constant = f"<p class='constant'>constant: {'; '.join(still)}</p>" if still else ""
    return f"<div class='charts'>{charts}</div>{constant}"


def _eval_table(run: RunFiles) -> str:
    rows = eval_rows(run)
    if not rows:
        return "<p class='empty'>No evaluation records (eval/*.jsonl).</p>"
    head = ("<tr><th>policy</th><th>mode</th><th>episodes</th><th>success</th><th>95% CI (Wilson)</th>"
            "<th>mean return</th><th>turns</th><th>tokens</th><th>truncated</th><th>tool errors</th><th>lost</th></tr>")
    body = "".join(_eval_row(r) for r in rows)
    return f"<table class='eval'>{head}{body}</table>"


def _eval_row(r: dict[str, Any]) -> str:
    cells = [escape(r["tag"]), escape(r["mode"]), str(r["episodes"]), f"{100 * r['success']:.1f}%",
             f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}%", f"{r['mean_return']:.3f}",
             f"{r['mean_turns']:.2f}", f"{r['mean_tokens']:.1f}", f"{100 * r['truncated']:.1f}%",
             "–" if r["tool_error_rate"] is None else f"{100 * r['tool_error_rate']:.1f}%", str(r["lost"])]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _viewer() -> str:
    return ("<div class='filters'>"
            "<label>evaluation <select id='f-eval'><option value=''>all</option></select></label>"
            "<label>outcome <select id='f-outcome'><option value=''>all</option>"
            "<option value='success'>success</option><option value='failure'>failure</option></select></label>"
            "<label>task or seed <input id='f-text' type='search' placeholder='e.g. calc:2 or 17'></label>"
            "<span id='f-count'></span></div>"
            "<div class='viewer'><div class='list'><table id='episodes'><thead><tr><th>evaluation</th><th>seed</th>"
            "<th>task</th><th>success</th><th>return</th><th>turns</th><th>tokens</th></tr></thead>"
            "<tbody></tbody></table></div><div id='episode' class='episode'>"
            "<p class='empty'>Click an episode to see its turns.</p></div></div>")
