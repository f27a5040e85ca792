"""The drift report's figures (matplotlib, Agg): a column against its reference, and the
margin density (and error rate) over the stream."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distml.drift.columns import category_table, discrete_counts  # noqa: E402


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def plot_numeric(column: dict[str, Any], values: np.ndarray, result: dict[str, Any],
                 path: Path) -> None:
    """Reference sample's empirical CDF against the new values' (KS is their largest gap);
    a discrete column's shares side by side."""
    if column.get("discrete"):
        names = [*(f"{v:g}" for v in column["values"]), "(other)"]
        ref = np.append(np.asarray(column["counts"]), 0)
        _bars(names, ref, discrete_counts(column, values), column["name"], result, path)
        return
    ref = np.asarray(column["sample"], np.float64)
    x = np.sort(np.asarray(values, np.float32)[~np.isnan(values)])
    grid = np.linspace(min(ref[0], x[0]), max(ref[-1], x[-1]), 400)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(grid, np.searchsorted(ref, grid, side="right") / len(ref), drawstyle="steps-post",
            label=f"reference (sample of {len(ref):,} of {column['rows']:,} training rows)")
    ax.plot(grid, np.searchsorted(x, grid, side="right") / len(x),
            label=f"new ({len(x):,} rows)", drawstyle="steps-post")
    ax.set_xlabel(f"{column['name']} (as the model sees it, after preprocessing)")
    ax.set_ylabel("cumulative share")
    _title(ax, column["name"], result)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_categorical(column: dict[str, Any], counts: dict[str, int], result: dict[str, Any],
                     path: Path) -> None:
    names, ref, new = category_table(column, counts)
    _bars(names, ref, new, column["name"], result, path)


def _bars(names: list[str], ref: np.ndarray, new: np.ndarray, name: str,
          result: dict[str, Any], path: Path) -> None:
    keep = (ref + new) > 0
    names = [n for n, k in zip(names, keep, strict=True) if k]
    ref, new = ref[keep] / max(1, ref.sum()), new[keep] / max(1, new.sum())
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 3.6))
    ax.bar(pos - 0.2, ref, 0.4, label="reference (training)")
    ax.bar(pos + 0.2, new, 0.4, label="new")
    ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of rows")
    _title(ax, name, result)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_stream(report: dict[str, Any], path: Path) -> None:
    """Margin density per window, its reference and alarm bounds, alarms; the error rate per
    window and its alarms when labels were given."""
    lf, sup = report["label_free"], report["supervised"]
    panels = [p for p in (lf, sup) if p is not None and p["history"]]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(7, 2.8 * max(1, len(panels))),
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=False):
        pos, rate = np.asarray(panel["history"]).T
        ax.plot(pos, rate, lw=1)
        if panel is lf:
            ax.axhline(lf["reference_density"], color="k", ls="--", lw=1, label="reference")
            ax.axhspan(*lf["bounds"], color="g", alpha=0.1, label="no-alarm band")
            ax.set_ylabel(f"margin density\n(top-2 gap < {lf['threshold']:.2f})")
        else:
            ax.axhline(sup["reference_error_rate"], color="k", ls="--", lw=1,
                       label="validation error")
            ax.axhline(sup["bound"], color="r", ls=":", lw=1, label="alarm above")
            ax.set_ylabel(f"error rate\n(window of {sup['window']})")
        for a in panel["alarms"]:
            ax.axvline(a, color="r", lw=0.8, alpha=0.6)
        ax.set_xlabel("row")
        ax.legend(fontsize=8, loc="upper left")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "too few rows for one window", ha="center")
    _save(fig, path)


def _title(ax: Any, name: str, r: dict[str, Any]) -> None:
    effect = "normed Wasserstein" if r["effect_measure"] == "wasserstein_normed" else "JS"
    ax.set_title(f"{name}: {r['test']} {r['statistic']:.3g}, adjusted p {r['p_adjusted']:.2g}, "
                 f"{effect} {r['effect']:.3f}", fontsize=9)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
