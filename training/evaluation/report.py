"""The evaluation report: every method of a run side by side, mean ± std over seeds.

:func:`write_report` takes one metrics dict per seed for each method (what
:func:`training.evaluation.ranking.evaluate_scores` returns) and writes, atomically:

* ``report.md``: a markdown table, one row per method, cells ``mean ± std`` (sample standard
  deviation over seeds, ddof=1; 0 with a single seed) with the number of seeds per method, the
  best mean of each quality column in bold; then, when the dicts carry per-request values
  (:class:`~training.evaluation.ranking.Evaluation`), a second table of each method's
  difference to the baseline with its paired request-bootstrap interval
  (:mod:`training.evaluation.bootstrap`); then the plots as relative image links;
* ``report.html``: the same tables and notes as one self-contained page, plots embedded as
  base64 PNG, no external assets;
* ``report.json``: the raw per-seed values plus mean, std and n per metric (NaN written as
  null), and the bootstrap's settings and intervals (every metric it covers, not only the
  table's columns);
* ``metrics.png``: a grouped bar chart of a few headline metrics with std error bars, and
  ``curves.png`` (when curves are given): quality against compute share, one line per curve.

matplotlib is imported only when a report is written, and only its object-oriented API with the
Agg canvas is used, so nothing here touches pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from training.evaluation.bootstrap import (
    BootstrapResult,
    BootstrapSettings,
    Interval,
    RequestValues,
    paired_bootstrap,
)
from training.evaluation.ranking import Evaluation
from training.io import atomic_path

MARKDOWN_NAME: Final = "report.md"
HTML_NAME: Final = "report.html"
JSON_NAME: Final = "report.json"
METRICS_PLOT_NAME: Final = "metrics.png"
CURVES_PLOT_NAME: Final = "curves.png"

COUNT_METRICS: Final = frozenset(
    {
        "rows",
        "positives",
        "requests_evaluated",
        "unexposed_rows",
        "unexposed_positives",
        "unexposed_requests_evaluated",
        "longtail_requests_evaluated",
        "longtail_positives",
        "unexposed_longtail_requests_evaluated",
        "unexposed_longtail_positives",
        "category_requests_evaluated",
    }
)
"""Metrics that are sizes, not quality: never bolded, never plotted."""

MAX_BAR_METRICS: Final = 6
#: The comparison's reference when the caller names none and the results have it: the model
#: trained on exposed rows only, what production pre-rankers usually do.
DEFAULT_BASELINE: Final = "exposed"
DEFAULT_BOOTSTRAP: Final = BootstrapSettings()

_DEFAULT_PATTERNS: Final[tuple[str, ...]] = (
    "auc",
    "gauc",
    "recall@{k}",
    "ndcg@{k}",
    "unexposed_auc",
    "unexposed_recall@{k}",
    "unexposed_ndcg@{k}",
    "longtail_recall@{K}",
    "ild@{K}",
    "category_recall@{K}",
)
"""Default columns; ``{k}`` expands to every cut-off found, ``{K}`` to the largest."""


@dataclass(frozen=True)
class ReportPaths:
    """Files written by :func:`write_report`."""

    markdown: Path
    html: Path
    json: Path
    plots: list[Path]


@dataclass(frozen=True)
class _Summary:
    values: list[float]  # one per seed, NaN where the seed lacks the metric or it is undefined
    mean: float
    std: float
    n: int  # seeds with a finite value


def write_report(
    results: Mapping[str, Sequence[Mapping[str, float]]],
    out_dir: Path,
    title: str,
    notes: list[str] | None = None,
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    curve_labels: tuple[str, str] = ("FLOPs share", "NDCG@50"),
    primary: list[str] | None = None,
    baseline: str | None = None,
    bootstrap: BootstrapSettings | None = DEFAULT_BOOTSTRAP,
) -> ReportPaths:
    """Write the markdown, HTML and JSON report and its plots into ``out_dir``.

    Args:
        results: Method name -> one metrics dict per seed, in the order the methods should be
            listed.
        out_dir: Directory for the report files (created when missing).
        title: Report title.
        notes: Free-text lines shown under the title (data, config, caveats).
        curves: Optional curve name -> ``(x, y)`` points, e.g. routing share vs quality; drawn
            as one line each, sorted by x.
        curve_labels: Axis labels ``(x, y)`` for the curve plot.
        primary: Metric columns, in order; default: AUC, GAUC, recall/NDCG at every K, their
            unexposed variants, then long-tail recall, ILD and category recall at the largest
            K, whichever are present.
        baseline: The method every other is compared with in the bootstrap table; default
            ``exposed`` when it has per-request values, else the first method that has them.
        bootstrap: Resampling settings of the paired request bootstrap; None skips it. It runs
            only over methods whose every seed is an
            :class:`~training.evaluation.ranking.Evaluation` with per-request values.

    Returns:
        The paths written.

    Raises:
        ValueError: when ``results`` is empty, a method has no seeds, a ``primary`` metric
            appears in no result, or ``baseline`` is not a method with per-request values.
    """
    if not results:
        raise ValueError("results is empty: nothing to report")
    empty = [name for name, seeds in results.items() if not seeds]
    if empty:
        raise ValueError(f"methods without any seed result: {empty}")
    summary = _summarize(results)
    columns = _columns(results, primary)
    notes = list(notes or [])
    comparison = (
        _paired_intervals(results, summary, baseline, bootstrap) if bootstrap is not None else None
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    pngs: dict[str, bytes] = {METRICS_PLOT_NAME: _bar_chart(summary, columns, title)}
    if curves:
        pngs[CURVES_PLOT_NAME] = _curve_plot(curves, curve_labels, title)
    plots = []
    for name, data in pngs.items():
        path = out_dir / name
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        plots.append(path)

    n_seeds = {name: len(seeds) for name, seeds in results.items()}
    paths = ReportPaths(out_dir / MARKDOWN_NAME, out_dir / HTML_NAME, out_dir / JSON_NAME, plots)
    _write_text(
        paths.markdown, _markdown(title, notes, summary, columns, n_seeds, pngs, comparison)
    )
    _write_text(paths.html, _html(title, notes, summary, columns, n_seeds, pngs, comparison))
    payload = {
        "title": title,
        "notes": notes,
        "columns": columns,
        "methods": {
            name: {
                "n_seeds": n_seeds[name],
                "seeds": [{k: _json_float(v) for k, v in seed.items()} for seed in results[name]],
                "mean": {k: _json_float(s.mean) for k, s in metrics.items()},
                "std": {k: _json_float(s.std) for k, s in metrics.items()},
                "n": {k: s.n for k, s in metrics.items()},
            }
            for name, metrics in summary.items()
        },
        "curves": {
            name: {
                "labels": list(curve_labels),
                "points": [[_json_float(x), _json_float(y)] for x, y in pts],
            }
            for name, pts in (curves or {}).items()
        },
        "bootstrap": _bootstrap_json(comparison),
    }
    _write_text(paths.json, json.dumps(payload, indent=2) + "\n")
    return paths


def _summarize(
    results: Mapping[str, Sequence[Mapping[str, float]]],
) -> dict[str, dict[str, _Summary]]:
    out: dict[str, dict[str, _Summary]] = {}
    for name, seeds in results.items():
        keys = list(dict.fromkeys(k for seed in seeds for k in seed))
        out[name] = {}
        for key in keys:
            values = [float(seed.get(key, math.nan)) for seed in seeds]
            finite = np.array([v for v in values if math.isfinite(v)])
            mean = float(finite.mean()) if finite.size else math.nan
            std = (
                float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else math.nan)
            )
            out[name][key] = _Summary(values, mean, std, int(finite.size))
    return out


def _paired_intervals(
    results: Mapping[str, Sequence[Mapping[str, float]]],
    summary: dict[str, dict[str, _Summary]],
    baseline: str | None,
    settings: BootstrapSettings,
) -> BootstrapResult | None:
    """The paired bootstrap over the methods with per-request values, or None without any.

    Only intervals whose point estimate is the value in the table are kept: a metric assigned
    after evaluation without its parts (not through
    :meth:`~training.evaluation.ranking.Evaluation.with_metrics_from`) no longer matches the
    per-request values it came with, and an interval for other scores would mislead.
    """
    values: dict[str, list[RequestValues]] = {}
    for name, seeds in results.items():
        carried = [s.request_values for s in seeds if isinstance(s, Evaluation)]
        if len(carried) == len(seeds) and all(rv is not None for rv in carried):
            values[name] = [rv for rv in carried if rv is not None]
    if baseline is not None and baseline not in values:
        raise ValueError(
            f"baseline {baseline!r} is not a method with per-request values (results of "
            f"evaluate_scores); those are {list(values)}"
        )
    if not values:
        return None
    if baseline is None:
        baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in values else next(iter(values))
    ids = values[baseline][0].request_ids
    # Methods scored on other requests cannot be paired with the baseline: no interval.
    values = {
        name: seeds
        for name, seeds in values.items()
        if all(np.array_equal(rv.request_ids, ids) for rv in seeds)
    }
    result = paired_bootstrap(values, baseline, settings)

    def shown(name: str, metric: str) -> bool:
        estimate = result.estimates.get(name, {}).get(metric, math.nan)
        table = summary[name][metric].mean if metric in summary[name] else math.nan
        if math.isnan(estimate) or math.isnan(table):
            return math.isnan(estimate) and math.isnan(table)
        return math.isclose(estimate, table, rel_tol=1e-9, abs_tol=1e-9)

    intervals = {
        name: {m: iv for m, iv in metrics.items() if shown(baseline, m) and shown(name, m)}
        for name, metrics in result.intervals.items()
    }
    return BootstrapResult(
        result.baseline,
        result.settings,
        result.requests,
        result.estimates,
        intervals,
        result.seconds,
    )


def _bootstrap_json(comparison: BootstrapResult | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    return {
        "baseline": comparison.baseline,
        "resamples": comparison.settings.resamples,
        "confidence": comparison.settings.confidence,
        "seed": comparison.settings.seed,
        "requests": comparison.requests,
        "seconds": round(comparison.seconds, 3),
        "methods": {
            name: {
                metric: {
                    "difference": _json_float(iv.difference),
                    "low": _json_float(iv.low),
                    "high": _json_float(iv.high),
                }
                for metric, iv in metrics.items()
            }
            for name, metrics in comparison.intervals.items()
        },
    }


def _interval_columns(comparison: BootstrapResult, columns: list[str]) -> list[str]:
    return [
        c
        for c in columns
        if c not in COUNT_METRICS and any(c in m for m in comparison.intervals.values())
    ]


def _format_interval(interval: Interval | None) -> str:
    if interval is None or not math.isfinite(interval.difference):
        return "—"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{interval.difference:+.3f}"
    return f"{interval.difference:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def _interval_rows(
    comparison: BootstrapResult, methods: Sequence[str], columns: list[str]
) -> list[tuple[str, list[str]]]:
    """(method, cells) for every method but the baseline, in the table's order."""
    return [
        (name, [_format_interval(comparison.intervals.get(name, {}).get(c)) for c in columns])
        for name in methods
        if name != comparison.baseline
    ]


def _interval_heading(comparison: BootstrapResult) -> str:
    return f"Request-level uncertainty: difference to {comparison.baseline}, paired bootstrap"


def _interval_sentence(comparison: BootstrapResult) -> str:
    cfg = comparison.settings
    return (
        f"Each cell is the method's mean minus {comparison.baseline}'s, then the "
        f"{cfg.confidence:.0%} percentile interval of that difference over {cfg.resamples:,} "
        f"resamples of the {comparison.requests:,} evaluation requests (with replacement, the "
        f"same resample for both methods; seed {cfg.seed}). It covers which requests happened "
        "to be evaluated, with the trained models held fixed: not the seed variance, the ± "
        "above. Pooled AUCs resample their first-order expansion per request. —: no interval "
        "(no per-request values, or a value not computed from them)."
    )


def _columns(
    results: Mapping[str, Sequence[Mapping[str, float]]], primary: list[str] | None
) -> list[str]:
    present = list(dict.fromkeys(k for seeds in results.values() for s in seeds for k in s))
    if primary is not None:
        unknown = [m for m in primary if m not in present]
        if unknown:
            raise ValueError(f"primary metrics {unknown} appear in no result; have {present}")
        return list(primary)
    ks = sorted({int(m.group(1)) for key in present if (m := re.fullmatch(r"ndcg@(\d+)", key))})
    wanted: list[str] = []
    for pattern in _DEFAULT_PATTERNS:
        if "{k}" in pattern:
            wanted += [pattern.format(k=k) for k in ks]
        elif "{K}" in pattern:
            wanted += [pattern.format(K=ks[-1])] if ks else []
        else:
            wanted.append(pattern)
    chosen = [m for m in dict.fromkeys(wanted) if m in present]
    return chosen or present


def _format(summary: _Summary | None) -> str:
    if summary is None or summary.n == 0:
        return "—"
    digits = 1 if abs(summary.mean) >= 100 else 4
    return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"


def _best(summary: dict[str, dict[str, _Summary]], column: str) -> set[str]:
    """Methods with the highest mean in a quality column (none for count columns)."""
    if column in COUNT_METRICS or len(summary) < 2:
        return set()
    means = {
        name: m[column].mean
        for name, m in summary.items()
        if column in m and math.isfinite(m[column].mean)
    }
    if not means:
        return set()
    top = max(means.values())
    best = {name for name, value in means.items() if value == top}
    return best if len(best) < len(summary) else set()  # a tie of all says nothing


def _table_rows(
    summary: dict[str, dict[str, _Summary]], columns: list[str], n_seeds: dict[str, int]
) -> list[tuple[str, str, list[tuple[str, bool]]]]:
    """(method, seeds, [(cell, is_best)]) per method."""
    best = {c: _best(summary, c) for c in columns}
    return [
        (name, str(n_seeds[name]), [(_format(m.get(c)), name in best[c]) for c in columns])
        for name, m in summary.items()
    ]


def _seed_sentence(n_seeds: dict[str, int]) -> str:
    counts = sorted(set(n_seeds.values()))
    n = f"n = {counts[0]} seeds" if len(counts) == 1 else "n seeds per method as listed"
    return (
        f"Cells are mean ± std over seeds ({n}; sample std, ddof=1; 0 with one seed). "
        "Best mean per quality column in bold (unless all tie)."
    )


def _markdown(
    title: str,
    notes: list[str],
    summary: dict[str, dict[str, _Summary]],
    columns: list[str],
    n_seeds: dict[str, int],
    pngs: dict[str, bytes],
    comparison: BootstrapResult | None = None,
) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += [_seed_sentence(n_seeds), ""]
    lines.append("| method | seeds | " + " | ".join(esc(c) for c in columns) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in columns) + " |")
    for name, seeds, cells in _table_rows(summary, columns, n_seeds):
        shown = [f"**{cell}**" if best else cell for cell, best in cells]
        lines.append(f"| {esc(name)} | {seeds} | " + " | ".join(shown) + " |")
    lines.append("")
    if comparison is not None and (wanted := _interval_columns(comparison, columns)):
        lines += [f"## {esc(_interval_heading(comparison))}", "", _interval_sentence(comparison)]
        lines += ["", "| method | " + " | ".join(esc(c) for c in wanted) + " |"]
        lines.append("| --- | " + " | ".join("---:" for _ in wanted) + " |")
        for name, interval_cells in _interval_rows(comparison, list(summary), wanted):
            lines.append(f"| {esc(name)} | " + " | ".join(interval_cells) + " |")
        lines.append("")
    for name in pngs:
        lines += [f"![{Path(name).stem}]({name})", ""]
    return "\n".join(lines)


_CSS: Final = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _html(
    title: str,
    notes: list[str],
    summary: dict[str, dict[str, _Summary]],
    columns: list[str],
    n_seeds: dict[str, int],
    pngs: dict[str, bytes],
    comparison: BootstrapResult | None = None,
) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<p>{esc(_seed_sentence(n_seeds))}</p>")
    header = "".join(f"<th>{esc(c)}</th>" for c in ["method", "seeds", *columns])
    parts.append(f"<table><thead><tr>{header}</tr></thead><tbody>")
    for name, seeds, cells in _table_rows(summary, columns, n_seeds):
        tds = "".join(f"<td><b>{esc(c)}</b></td>" if b else f"<td>{esc(c)}</td>" for c, b in cells)
        parts.append(f"<tr><td>{esc(name)}</td><td>{seeds}</td>{tds}</tr>")
    parts.append("</tbody></table>")
    if comparison is not None and (wanted := _interval_columns(comparison, columns)):
        parts.append(f"<h2>{esc(_interval_heading(comparison))}</h2>")
        parts.append(f"<p>{esc(_interval_sentence(comparison))}</p>")
        header = "".join(f"<th>{esc(c)}</th>" for c in ["method", *wanted])
        parts.append(f"<table><thead><tr>{header}</tr></thead><tbody>")
        for name, interval_cells in _interval_rows(comparison, list(summary), wanted):
            tds = "".join(f"<td>{esc(c)}</td>" for c in interval_cells)
            parts.append(f"<tr><td>{esc(name)}</td>{tds}</tr>")
        parts.append("</tbody></table>")
    for name, data in pngs.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<img alt="{esc(Path(name).stem)}" src="data:image/png;base64,{encoded}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _bar_chart(summary: dict[str, dict[str, _Summary]], columns: list[str], title: str) -> bytes:
    """Grouped bars: one group per headline metric, one bar per method, std error bars."""
    metrics = [c for c in columns if c not in COUNT_METRICS][:MAX_BAR_METRICS]
    methods = list(summary)
    fig = _figure(max(6.0, 1.2 * len(metrics) * max(1, len(methods)) / 2 + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(metrics))
    for i, name in enumerate(methods):
        stats = [summary[name].get(m) for m in metrics]
        means = [s.mean if s is not None and s.n else np.nan for s in stats]
        stds = [s.std if s is not None and s.n else 0.0 for s in stats]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name
        )
    ax.set_xticks(x, metrics, rotation=20, ha="right")
    ax.set_ylabel("mean ± std over seeds")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if methods:
        ax.legend(fontsize="small")
    return _png(fig)


def _curve_plot(
    curves: Mapping[str, Sequence[tuple[float, float]]], labels: tuple[str, str], title: str
) -> bytes:
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, points in curves.items():
        pts = sorted((float(a), float(b)) for a, b in points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
