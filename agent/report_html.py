"""The right-sizing report as one self-contained HTML file, for a finance/engineering review.

Why one file with inline SVG: it is mailed, attached to tickets and opened on laptops without
network access, so nothing may be fetched (no CDN script, font or image). Charts are drawn by
matplotlib (the optional `report` extra) to SVG text and embedded; the page has no JavaScript.
"""

from __future__ import annotations

import datetime as dt
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to files only
import matplotlib.pyplot as plt

from agent.recommend import Recommendation

ACTION_COLOURS = {"release": "#c0392b", "downsize_mig": "#e67e22", "downsize_gpu": "#f1c40f",
                  "consolidate": "#8e44ad", "scale_up": "#2471a3", "keep": "#7f8c8d"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:0} .sub{color:#666;margin-top:4px}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:12px 16px;min-width:200px}
.card .v{font-size:26px;font-weight:600} .card .k{color:#666;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:13px} td,th{border-bottom:1px solid #eee;padding:4px 6px;text-align:left}
.act{color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}
.wl{border-top:2px solid #eee;margin-top:24px;padding-top:8px} .charts{display:flex;gap:8px;flex-wrap:wrap}
.chart svg{width:380px;height:auto} .reason{color:#333}
"""


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline SVG in HTML5


def _money(x: float) -> str:
    return f"${x:,.0f}"


def _hours(series: dict[str, list[Any]]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(h, dt.UTC) for h in series.get("hour", [])]


def _num(xs: list[Any]) -> list[float]:
    return [float("nan") if x is None else float(x) for x in xs]


def _capacity_chart(r: Recommendation) -> str:
    s = r.series
    t = _hours(s)
    fig, ax = plt.subplots(figsize=(5.0, 2.6))
    ax.step(t, _num(s["allocated"]), where="post", color="#34495e", label="allocated (GPU-eq.)")
    ax.fill_between(t, _num(s["used_p50"]), _num(s["used_p95"]), color="#27ae60", alpha=0.35, step="post",
                    label="used p50–p95")
    ax.plot(t, _num(s["used_p95"]), color="#27ae60", linewidth=1, drawstyle="steps-post")
    ax.set_ylim(bottom=0)
    ax.set_title("Allocated capacity vs used activity", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(labelsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


def _memory_chart(r: Recommendation) -> str:
    s = r.series
    t = _hours(s)
    fig, ax = plt.subplots(figsize=(5.0, 2.6))
    ax.plot(t, [x / 2**30 for x in _num(s["memory_peak"])], color="#8e44ad", label="memory peak (GiB)")
    if r.target_memory_bytes:
        ax.axhline(r.target_memory_bytes / 2**30, color="#e67e22", linestyle="--",
                   label=f"target {r.target or 'memory'} ({r.target_memory_bytes / 2**30:.1f} GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory peak vs the recommended target", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


def _queue_chart(r: Recommendation) -> str:
    s = r.series
    t = _hours(s)
    fig, ax = plt.subplots(figsize=(5.0, 2.6))
    ax.plot(t, _num(s["queue_p95"]), color="#2471a3", label="queue p95 (requests)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.fill_between(t, _num(s["saturated"]), color="#c0392b", alpha=0.25, step="post", label="saturated share")
    ax2.set_ylim(0, 1.05)
    ax.set_title("Queue and saturation", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    ax.tick_params(labelsize=7)
    ax2.tick_params(labelsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


def _bars(title: str, data: dict[str, float], colours: dict[str, str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(5.0, 2.4))
    keys = list(data) or ["(none)"]
    vals = [data.get(k, 0.0) for k in keys]
    ax.barh(keys, vals, color=[(colours or {}).get(k, "#16a085") for k in keys])
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("${x:,.0f}"))
    return _svg(fig)


def render_html(recs: Sequence[Recommendation], source: str = "", summary: dict[str, Any] | None = None) -> str:
    """The whole report: summary cards and bars, the table, and per workload its charts and reason."""
    summary = summary or {}
    esc = html.escape
    start = min((r.window_start for r in recs), default=0.0)
    end = max((r.window_end for r in recs), default=0.0)
    fmt = "%Y-%m-%d %H:%M UTC"
    window = (f"{dt.datetime.fromtimestamp(start, dt.UTC):{fmt}} – {dt.datetime.fromtimestamp(end, dt.UTC):{fmt}}"
              if recs else "no data")
    spend = sum(r.current_monthly_cost_dollars for r in recs)
    idle = sum(r.current_monthly_cost_dollars * r.idle_ratio for r in recs)
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gpucap right-sizing</title>"
             f"<style>{_CSS}</style></head><body>"),
             "<h1>GPU right-sizing</h1>",
             f"<p class='sub'>{esc(window)} · {len(recs)} workloads · source: {esc(source)} · a month is 730 h</p>",
             "<div class='cards'>",
             f"<div class='card'><div class='v'>{_money(spend)}</div><div class='k'>monthly GPU spend (run rate)</div></div>",
             f"<div class='card'><div class='v'>{_money(idle)}</div><div class='k'>of it idle reserved</div></div>",
             (f"<div class='card'><div class='v'>{_money(summary.get('monthly_savings_dollars', 0.0))}</div>"
             "<div class='k'>monthly savings available</div></div>"),
             (f"<div class='card'><div class='v'>{_money(summary.get('scale_up_monthly_cost_dollars', 0.0))}</div>"
             "<div class='k'>to add where saturated</div></div></div>"),
             "<div class='charts'>",
             f"<div class='chart' id='chart-by-action'>{_bars('Savings by action', summary.get('savings_by_action', {}), ACTION_COLOURS)}</div>",
             f"<div class='chart' id='chart-by-team'>{_bars('Savings by team', summary.get('savings_by_team', {}))}</div>",
             "</div>",
             ("<table><tr><th>workload</th><th>team</th><th>now</th><th>action</th><th>target</th>"
             "<th>$/month now</th><th>saves $/month</th><th>confidence</th></tr>")]
    for r in recs:
        parts.append(
            f"<tr><td>{esc(r.namespace)}/{esc(r.workload)}</td><td>{esc(r.team)}</td>"
            f"<td>{r.allocation:g}× {esc(r.gpu_model)}</td>"
            f"<td><span class='act' style='background:{ACTION_COLOURS.get(r.action, '#999')}'>{esc(r.action)}</span></td>"
            f"<td>{esc(r.target or '-')}</td><td>{_money(r.current_monthly_cost_dollars)}</td>"
            f"<td>{_money(r.monthly_savings_dollars)}</td><td>{r.confidence:.2f}</td></tr>")
    parts.append("</table>")
    for i, r in enumerate(recs):
        parts.append(f"<div class='wl'><h3>{esc(r.namespace)}/{esc(r.workload)} "
                     f"<span class='act' style='background:{ACTION_COLOURS.get(r.action, '#999')}'>{esc(r.action)}"
                     f"</span> {esc(r.target)}</h3><p class='reason'>{esc(r.reason)}</p><div class='charts'>")
        if r.series.get("hour"):
            parts.append(f"<div class='chart' id='w{i}-capacity'>{_capacity_chart(r)}</div>")
            parts.append(f"<div class='chart' id='w{i}-memory'>{_memory_chart(r)}</div>")
            if any(x is not None for x in r.series.get("queue_p95", [])):
                parts.append(f"<div class='chart' id='w{i}-queue'>{_queue_chart(r)}</div>")
        parts.append("</div></div>")
    parts.append("<p class='sub'>gpucap recommend · memory sized to the peak plus headroom, compute to the p95 "
                 "activity over the target utilization; saturated workloads are never downsized.</p></body></html>\n")
    return "\n".join(parts)
