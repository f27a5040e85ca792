"""The report's section on each searched candidate: its trials, and Optuna's plots of the
study (optimisation history, parallel coordinates, parameter importance) as PNGs beside
report.md, named ``search-<candidate>-<plot>.png``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from distml.rundir import RunDir  # noqa: E402
from distml.search.space import open_storage  # noqa: E402

logger = logging.getLogger(__name__)

PLOTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "history": ("optimisation history", optuna_plots.plot_optimization_history),
    "parallel": ("parallel coordinates", optuna_plots.plot_parallel_coordinate),
    "importance": ("parameter importance", optuna_plots.plot_param_importances),
}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)


def trials_table(search: dict[str, Any]) -> list[str]:
    """A markdown table of the trials: state, value, evaluations, values, reason."""
    trials = search["trials"]
    keys = sorted({k for t in trials for k in t["params"]})
    lines = ["| trial | state | value | evaluations | seconds | " + " | ".join(keys)
             + " | reason |", "|---" * (6 + len(keys)) + "|"]
    for t in trials:
        seconds = (t["end"] - t["start"]) if t["start"] and t["end"] else None
        best = " ★" if t["number"] == search["best_trial"] else ""
        lines.append(f"| {t['number']}{best} | {t['state']} | {_fmt(t['value'])} | "
                     f"{_fmt(t['evals'])} | {_fmt(seconds)} | "
                     + " | ".join(_fmt(t["params"].get(k)) for k in keys)
                     + f" | {t['reason'] or ''} |")
    return lines


def plot_study(run: RunDir, candidate: str, search: dict[str, Any]) -> list[str]:
    """Optuna's plots of the study; the report's image lines for those it could draw (the
    importance needs two completed trials, say)."""
    local = run.path / "search" / f"{candidate}.db"  # the default storage, where the run is
    url = f"sqlite:///{local.resolve()}" if local.is_file() else search["storage"]
    try:
        study = optuna.load_study(study_name=search["study"], storage=open_storage(url))
    except Exception as e:  # noqa: BLE001 - a storage out of reach costs the plots alone
        logger.warning("no plots of %s's search: its study at %s: %s", candidate,
                       search["storage"], e)
        return []
    lines = []
    for key, (title, plot) in PLOTS.items():
        name = f"search-{candidate}-{key}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these plots experimental
                ax = plot(study)
            fig = ax.ravel()[0].figure if hasattr(ax, "ravel") else ax.figure
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(run.plot(name), dpi=100)
            plt.close(fig)
        except Exception as e:  # noqa: BLE001 - a plot the study cannot make is left out
            logger.info("no %s plot for %s: %s", title, candidate, e)
            continue
        lines += ["", f"![{candidate}: {title}]({name})"]
    return lines


def search_lines(run: RunDir, searches: dict[str, dict[str, Any]]) -> list[str]:
    """The report's search section (nothing when no candidate was searched)."""
    lines: list[str] = []
    for candidate, search in searches.items():
        states = [t["state"] for t in search["trials"]]
        lines += ["", f"## Search: {candidate}", "",
                  f"{len(states)} trials ({states.count('complete')} complete, "
                  f"{states.count('pruned')} pruned, {states.count('fail')} failed); the "
                  f"best, trial {search['best_trial']}, stands for {candidate}: "
                  + ", ".join(f"{k}={v}" for k, v in search["best_params"].items()) + ".",
                  "", *trials_table(search), *plot_study(run, candidate, search)]
    return lines
