"""The human report of a run: report.md with PNG plots next to summary.json."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from distml.data.dataset import Manifest  # noqa: E402
from distml.fsutil import write_text_atomic  # noqa: E402
from distml.rundir import Project, RunDir  # noqa: E402
from distml.workflow.search_report import search_lines


def plot_loss_curves(results: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        loss = np.asarray(r["history"]["train_loss"])
        window = max(1, len(loss) // 50)  # light smoothing keeps curves readable
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_train.plot(np.arange(window, len(loss) + 1), smooth, label=r["name"])
        evals = r["history"]["evals"]
        ax_val.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker=".",
                    label=r["name"])
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set(title=title, xlabel="optimizer step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(results: list[dict[str, Any]], path: Path) -> None:
    """Per epoch and candidate: training samples/s and the fraction of time spent waiting for
    data."""
    fig, (ax_rate, ax_stall) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = sorted({e["epoch"] for r in results for e in r["epochs"]})
    for r in results:
        x = [e["epoch"] for e in r["epochs"]]
        label = f"{r['name']} ({r['strategy']} x{r['world_size']})"
        ax_rate.plot(x, [e["samples_per_s"] for e in r["epochs"]], marker="o", label=label)
        ax_stall.plot(x, [100 * e["data_stall"] for e in r["epochs"]], marker="o", label=label)
    ax_rate.set(title="training throughput", xlabel="epoch", ylabel="samples/s")
    ax_stall.set(title="data stall", xlabel="epoch", ylabel="% of step time waiting for data")
    for ax in (ax_rate, ax_stall):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_vs_time(results: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Validation ``metric`` against training wall time (evaluation pauses excluded), per
    candidate: how soon each strategy gets there, not only how far."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        evals = [e for e in r["history"]["evals"] if "elapsed_s" in e and metric in e]
        ax.plot([e["elapsed_s"] for e in evals], [e[metric] for e in evals], marker=".",
                label=f"{r['name']} ({r['strategy']} x{r['world_size']})")
    ax.set(title=f"validation {metric} against wall time", xlabel="training seconds",
           ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parameter_server_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per parameter-server candidate: the per-worker straggler view, staleness, dropped
    gradients and dead workers."""
    lines = []
    for r in results:
        ps = r.get("parameter_server")
        if not ps:
            continue
        st = ps["staleness"]
        lines += [
            "", f"### {r['name']}: parameter servers, mode {ps['mode']}", "",
            f"Servers {ps['servers']}, workers {ps['workers']}; staleness of the applied "
            f"gradients: mean {st['mean']:.2f}, p99 {st['p99']:.1f}, max {st['max']}"
            + (f" (ssp bound {ps['staleness_bound']}, largest lead granted "
               f"{ps['max_lead']})" if ps["staleness_bound"] is not None else "")
            + f"; dropped late gradients: {ps['dropped_gradients']}; dead workers: "
            f"{ps['dead_workers'] or 'none'}.", "",
            "| worker rank | items | batches | compute s | injected sleep s | waiting s | "
            "s per batch | waiting share |", "|---|---|---|---|---|---|---|---|",
            *[f"| {rank} | {w['items']:.0f} | {w['batches']:.0f} | {w['compute_s']:.2f} | "
              f"{w['straggle_s']:.2f} | {w['wait_s']:.2f} | {w['step_s']:.4f} | "
              f"{100 * w['wait_share']:.0f}% |" for rank, w in ps["per_worker"].items()],
            *_membership_lines(ps.get("membership") or []),
        ]
    return ["", "## Parameter servers (per worker)", *lines] if lines else []


def _membership_lines(events: list[dict[str, Any]]) -> list[str]:
    """Workers that joined the running job or left it (scaled down, or lost)."""
    if not events:
        return []
    return ["", "| time (UTC) | epoch | worker | event | workers before | workers after |",
            "|---|---|---|---|---|---|",
            *[f"| {datetime.fromtimestamp(e['time'], UTC).strftime('%H:%M:%S')} | "
              f"{e['epoch']} | {e['worker']} | {e['event']} | {e['workers_before']} | "
              f"{e['workers_after']} |" for e in events]]


def latest_scaling_studies(project: Project) -> list[dict[str, Any]]:
    """The newest ``distml scale`` result of each stage and mode under the project folder."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for path in project.scaling_studies():  # names sort by time
        study = json.loads(path.read_text())
        newest[study["stage"], study["mode"]] = {**study, "folder": str(path.parent)}
    return list(newest.values())


def _scaling_lines(run: RunDir, studies: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Scaling studies (`distml scale`)"]
    for study in studies:
        png = f"scaling-{study['stage']}-{study['mode']}.png"
        shutil.copyfile(Path(study["folder"]) / "scaling.png", run.plot(png))
        what = study["stage"] + (f" of {study['candidate']}" if study.get("candidate") else "")
        lines += [
            "", f"### {what}, {study['mode']} scaling", "", _amdahl_line(study)
            + f" Measured in `{study['folder']}` on {study['cores']} cores.", "",
            "| workers | seconds (median) | min-max | speedup | efficiency | Karp-Flatt |",
            "|---|---|---|---|---|---|",
            *[f"| {p['workers']} | {p['seconds']:.2f} | {p['seconds_min']:.2f}-"
              f"{p['seconds_max']:.2f} | {p['speedup']:.2f} | {p['efficiency']:.2f} | "
              + ("" if p["karp_flatt"] is None else f"{p['karp_flatt']:.3f}") + " |"
              for p in study["points"]],
            "", f"![{what} scaling]({png})",
        ]
    return lines


def _amdahl_line(study: dict[str, Any]) -> str:
    if study["amdahl_parallel_fraction"] is None:
        return "Amdahl's law not fitted: " + "; ".join(study["warnings"]) + "."
    smax = study["amdahl_max_speedup"]
    return (f"Amdahl fit: parallel fraction P = {study['amdahl_parallel_fraction']:.3f}, "
            f"maximum speedup {'unbounded' if smax is None else f'{smax:.1f}'}.")


def plot_confusion(targets: np.ndarray, preds: np.ndarray, labels: list[str], path: Path) -> None:
    cm = confusion_matrix(targets, preds, labels=range(len(labels)))
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels,
           yticklabels=labels, xlabel="predicted", ylabel="true", title="test confusion matrix")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distill_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per distilled student: teacher, the student trained alone (its twin), the distilled
    student, and the share of the teacher-twin gap that distillation recovered."""
    lines = ["", "## Distillation", ""]
    for r in rows:
        gap = r["gap_recovered"]
        lines += [
            f"**{r['student']}** learned from {' + '.join(r['teachers'])} (T = "
            f"{r['temperature']:g}, alpha = {r['alpha']:g}); test {r['metric']}, parameters "
            "and the median latency of a one-row forward pass in this process:", "",
            f"| model | test {r['metric']} | parameters | latency ms |", "|---|---|---|---|"]
        for label, key in (("teacher" + (" ensemble" if len(r["teachers"]) > 1 else ""),
                            "teacher"), (f"student alone ({r['twin']})", "alone"),
                           ("distilled student", "distilled")):
            m = r[key]
            if m is not None:
                lines.append(f"| {label} | {m['test']:.4f} | {m['params']:,} | "
                             f"{m['latency_ms']:.3f} |")
        lines += ["", "Gap recovered: " + (
            f"**{gap:.2f}** (distilled - alone) / (teacher - alone)." if gap is not None else
            "n/a (" + ("no twin: add a candidate with the same model and settings and no "
                       "distill)." if r["alone"] is None else "the twin equals the teacher).")),
            ""]
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(
    run: RunDir, summary: dict[str, Any], *, manifest: Manifest, selection: dict[str, Any],
    scaling: list[dict[str, Any]] = (),
) -> Path:
    """report.md: candidates, selection, test metrics, plots (loss, throughput, confusion,
    and the given scaling studies), stage timings."""
    metric = summary["metric"]
    plot_loss_curves(selection["ranked"], run.plot("loss_curves.png"))
    plot_throughput(selection["ranked"], run.plot("throughput.png"))
    plot_metric_vs_time(selection["ranked"], metric, run.plot("val_vs_time.png"))
    lines = [
        f"# distml run: {summary['name']}",
        "",
        f"Run folder `{run.path}`; config hash `{summary['config_hash']}`; task "
        f"{summary['task']}; rows train/val/test: "
        + "/".join(str(manifest.rows(s)) for s in ("train", "val", "test")) + ".",
        "",
        f"## Candidates, ranked by validation {metric}",
        "",
        "| rank | candidate | parameters | val " + " | val ".join(summary["candidates"][0]["val"])
        + " | strategy | steps | train s | samples/s | data stall | peak MiB/rank |",
        "|---" * (9 + len(summary["candidates"][0]["val"])) + "|",
    ]
    for i, c in enumerate(summary["candidates"], 1):
        vals = " | ".join(_fmt(v) for v in c["val"].values())
        peaks = " / ".join(f"{p / 2**20:.0f}" for p in c["peak_mem_bytes_per_rank"])
        lines.append(f"| {i} | {c['name']} | {c['params']:,} | {vals} | "
                     f"{c['strategy']} x{c['world_size']} | {c['steps']} | "
                     f"{c['train_seconds']:.1f} | {c['samples_per_s']:,.0f} | "
                     f"{100 * c['data_stall']:.1f}% | {peaks} |")
    reg = summary["registry"]
    lines += [
        "",
        f"Selected **{summary['selected']}**, registered as `{reg['name']}:{reg['version']}`"
        + (" and promoted to `production`." if reg["promoted"] else
           " (not promoted: the current production model is as good or better)."),
        "",
        "## Test metrics of the selected model",
        "",
        *[f"- {k}: {_fmt(v)}" for k, v in summary["test"].items()],
        *(_distill_lines(summary["distillation"]) if summary.get("distillation") else [""]),
        "## Plots",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![throughput and data stall per epoch](throughput.png)",
        "",
        f"![validation {metric} against wall time](val_vs_time.png)",
    ]
    if manifest.task == "classification":
        plot_confusion(selection["targets"], selection["predictions"], manifest.classes,
                       run.plot("confusion_matrix.png"))
        lines += ["", "![confusion matrix](confusion_matrix.png)"]
    lines += parameter_server_lines(selection["ranked"])
    lines += elastic_lines(summary.get("elastic", {}))
    lines += search_lines(run, summary.get("search", {}))
    if scaling:
        lines += _scaling_lines(run, scaling)
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.2f} |" for s in summary["stages"]]
    write_text_atomic(run.report, "\n".join(lines) + "\n")
    return run.report


def elastic_lines(elastic: dict[str, Any]) -> list[str]:
    """Elastic jobs: each membership change, and each epoch's row uses."""
    if not elastic:
        return []
    lines = ["", "## Elastic training", "",
             "| candidate | time (UTC) | world size | resumed at step | steps lost | "
             "recovery s |", "|---|---|---|---|---|---|"]
    for name, e in elastic.items():
        for c in e["membership_changes"]:
            when = datetime.fromtimestamp(c["time"], UTC).strftime("%H:%M:%S")
            lines.append(f"| {name} | {when} | {c['old_world_size']} -> {c['new_world_size']} "
                         f"| {c['resumed_step']} | {c['steps_lost']} | "
                         f"{_fmt(c.get('recovery_seconds'))} |")
        uses = "; ".join(f"epoch {s['epoch']}: {s['rows']} rows, used {s['min_uses']}-"
                         f"{s['max_uses']} times" for s in e["epoch_samples"])
        lines += ["", f"{name}: {uses}."]
    return lines
