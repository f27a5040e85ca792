"""``distml monitor``: a file of new rows against a model's training reference.

The input (CSV or Parquet, a file or a folder, as ``distml predict`` reads it) is read
whole, in file order, preprocessed and predicted by the model, and fed to a
``DriftMonitor``; its report becomes ``report.md`` with a table per column, a PNG per
drifted column and ``stream.png`` (margin density, and the error rate with ``--labels``,
over the rows), plus ``drift.json``. The folder is built under a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distml import storage
from distml.artifact import Artifact, load_artifact
from distml.data.dataset import Manifest, load_split
from distml.data.tables import raw_columns, read_table
from distml.drift.columns import Gate, column_values
from distml.drift.monitor import DriftMonitor, DriftSettings
from distml.drift.plots import plot_categorical, plot_numeric, plot_stream, safe_name
from distml.drift.reference import build_reference, read_reference
from distml.errors import ArtifactError, DataError
from distml.fsutil import write_json_atomic, write_text_atomic
from distml.serving.model import resolve
from distml.serving.predict import plan_parts
from distml.tasks import predict
from distml.trust import TrustPolicy

logger = logging.getLogger(__name__)


def reference_for(artifact: Artifact) -> dict[str, Any]:
    """The artifact's reference.json; for an artifact without one, built from its data folder."""
    try:
        return read_reference(artifact.path)
    except ArtifactError:
        data_dir = artifact.spec.get("data_dir")
        if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
            raise
    logger.warning("%s has no reference.json; building one from its training data at %s",
                   artifact.path, data_dir)
    manifest = Manifest.read(Path(data_dir))
    val, test = (tuple(torch.from_numpy(a) for a in load_split(manifest, split))
                 for split in ("val", "test"))
    ref = build_reference(manifest, artifact.model, val, test)
    assert ref is not None  # language models were refused before
    return ref


def read_input(path: Path, columns: list[str], label_column: str | None
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every part of the input (a path or a storage URL), in order: the raw model columns
    and the label column."""
    parts, labels = [], []
    for part in plan_parts(storage.as_url(path) or Path(path)):
        table = read_table(part.path if storage.as_url(part.path) else Path(part.path),
                           part.row_group)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{part.path} lacks {len(missing)} of the model's {len(columns)} "
                            f"input columns ({shown}); it has "
                            f"{', '.join(table.column_names[:10])}")
        if label_column is not None:
            if label_column not in table.column_names:
                raise DataError(f"--labels {label_column!r} is not a column of {part.path}; "
                                f"it has {', '.join(table.column_names[:20])}")
            labels.append(table[label_column].to_numpy(zero_copy_only=False))
        parts.append(raw_columns(table, columns))
    raw = {c: np.concatenate([p[c] for p in parts]) for c in columns}
    if len(next(iter(raw.values()), [])) == 0:
        raise DataError(f"--input {str(path)!r} has no rows")
    return raw, (np.concatenate(labels) if label_column is not None else None)


FILE_FALSE_ALARMS = 0.01  # expected false alarms of each detector over a whole file


def settings_for(rows: int, labels: int, *, gate: Gate, detector: str) -> DriftSettings:
    """Windows no longer than the file; at most ``FILE_FALSE_ALARMS`` expected false alarms
    per detector over the file's rows."""
    base = DriftSettings()
    return replace(base, **asdict(gate), detector=detector,
                   window_rows=rows,
                   margin_window=min(base.margin_window, rows),
                   error_window=min(base.error_window, max(labels, 1)),
                   false_alarm_rate=FILE_FALSE_ALARMS, horizon=max(rows, base.step))


def monitor(ref: str, input_path: Path, out_dir: Path, *, registry: Path,
            label_column: str | None = None, gate: Gate | None = None, detector: str = "window",
            trust: TrustPolicy | None = None) -> dict[str, Any]:
    """Run the drift report; returns it (as drift.json holds it). ``gate``: when a column is
    drifted (default: monitor.drift's defaults); ``trust``: the code the artifact may name
    (default: none)."""
    path, name, version = resolve(ref, registry)
    artifact = load_artifact(path, trust=trust)
    if artifact.task == "language_modeling":
        raise ArtifactError(f"{name}:{version} is a language model; distml monitor checks "
                            "classification and regression models")
    if label_column is not None and artifact.task != "classification":
        raise DataError("--labels needs a classification model (supervised drift watches "
                        f"the error stream); {name}:{version} is a {artifact.task} model")
    reference = reference_for(artifact)
    raw, labels = read_input(input_path, list(artifact.spec["input_columns"]), label_column)
    x = artifact.preprocess(raw)  # (N, F) model inputs
    outputs = predict(artifact.model, x)
    if artifact.task == "classification":
        outputs = outputs.softmax(-1)
    rows = len(x)
    mon = DriftMonitor(reference, feature_names=list(artifact.spec["feature_names"]),
                       labels=artifact.labels,
                       settings=settings_for(rows, rows if labels is not None else 0,
                                             gate=gate or Gate(), detector=detector))
    mon.update(x.numpy(), outputs.numpy())
    if labels is not None:
        mon.add_labels(labels)
    report = {"model": name, "version": version, "artifact": str(path),
              "input": str(input_path), **mon.report()}
    _write(report, reference, x.numpy(), list(artifact.spec["feature_names"]), out_dir)
    return report


def _write(report: dict[str, Any], reference: dict[str, Any], x: np.ndarray,
           feature_names: list[str], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = {n: j for j, n in enumerate(feature_names)}
        columns = {c["name"]: c for c in reference["columns"]}
        for result in report["columns"]:
            if not result["drifted"]:
                continue
            col = columns[result["column"]]
            values = column_values(col, x, index)
            target = tmp / f"column-{safe_name(col['name'])}.png"
            if col["kind"] == "numeric":
                plot_numeric(col, values, result, target)
            else:
                plot_categorical(col, values, result, target)
        if report["label_free"] is not None:
            plot_stream(report, tmp / "stream.png")
        write_json_atomic(tmp / "drift.json", report)
        write_text_atomic(tmp / "report.md", markdown(report))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _g(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    drifted = r["drifted_features"]
    lines = [
        f"# Drift report: {r['model']}:{r['version']} on {r['input']}", "",
        f"{r['rows']:,} rows. Data drift: **{len(drifted)} of {len(r['columns'])} columns** "
        f"({', '.join(drifted) or 'none'}): Benjamini-Hochberg adjusted p < {s['alpha']} and an "
        f"effect of at least {s['min_wasserstein']} (normed Wasserstein, continuous) or "
        f"{s['min_jensen_shannon']} (Jensen-Shannon, discrete). Largest PSI "
        f"{r['max_psi']:.3f}. {_concept(r)}", "",
        "| column | kind | test | statistic | p | adjusted p | effect | PSI | drifted |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    order = sorted(r["columns"], key=lambda c: (not c["drifted"], c["p_value"]))
    for c in order:
        mark = f"**yes** ([plot](column-{safe_name(c['column'])}.png))" if c["drifted"] else "no"
        effect = f"{c['effect']:.3f} ({'W' if c['test'] == 'ks' else 'JS'})"
        lines.append(f"| {c['column']} | {c['kind']} | {c['test']} | {c['statistic']:.4g} | "
                     f"{c['p_value']:.3g} | {c['p_adjusted']:.3g} | {effect} | {c['psi']:.3f} "
                     f"| {mark} |")
    p = r["prediction"]
    if p is not None:
        lines += ["", f"Predictions against the held-out reference rows': {p['test']} "
                  f"{p['statistic']:.4g}, p {p['p_value']:.3g}, PSI {p['psi']:.3f}"
                  f"{' (changed)' if p['drifted'] else ''}."]
    lf = r["label_free"]
    if lf is not None:
        lines += ["", "## Concept drift without labels (margin density, MD3)", "",
                  f"Margin: top-2 probability gap below {lf['threshold']:.2f}; reference density "
                  f"{lf['reference_density']:.3f}, last window {_g(lf['density'])}, no-alarm band "
                  f"{lf['bounds'][0]:.3f}-{lf['bounds'][1]:.3f} (windows of {lf['window']}). "
                  f"Alarms at rows: {_rows(lf['alarms'])}.", "", "![stream](stream.png)"]
    sup = r["supervised"]
    if sup is not None:
        lines += ["", f"## Supervised drift ({sup['method']})", "",
                  f"{sup['labels']:,} labels ({sup['unknown_labels']} not a known class); error "
                  f"rate {sup['error_rate']:.3f} against {_g(sup['reference_error_rate'])} on the "
                  f"held-out {sup['reference_split']} split. Alarms at rows: "
                  f"{_rows(sup['alarms'])}."]
    perf = r["performance"]
    if perf is not None:
        realised = ("" if perf["realised_accuracy"] is None else
                    f"; realised on the last {perf['realised_rows']:,} labelled rows "
                    f"{perf['realised_accuracy']:.3f}")
        lines += ["", "## Estimated accuracy without labels (CBPE)", "",
                  f"{perf['estimated_accuracy']:.3f} (95% interval {perf['interval'][0]:.3f}-"
                  f"{perf['interval'][1]:.3f}) over the last {perf['rows']:,} rows, from "
                  f"probabilities calibrated with temperature {perf['temperature']:.3g}; "
                  f"{perf['reference_accuracy']:.3f} on the held-out reference rows{realised}."]
    return "\n".join(lines) + "\n"


def _concept(r: dict[str, Any]) -> str:
    if r["concept_drift_from"] is None:
        return "Concept drift: not measured (no class probabilities and no labels)."
    return (f"Concept drift: **{'yes' if r['concept_drift'] else 'no'}** (from "
            f"{r['concept_drift_from']}).")


def _rows(alarms: list[int]) -> str:
    if not alarms:
        return "none"
    return ", ".join(str(a) for a in alarms[:20]) + (f" (+{len(alarms) - 20} more)"
                                                     if len(alarms) > 20 else "")


def run_monitor(ref: str, input_path: Path, out_dir: Path, *, registry: Path,
                labels: str | None, json_out: Path | None, gate: Gate, detector: str,
                trust: TrustPolicy | None = None) -> dict[str, Any]:
    """The CLI's entry: the report, and drift.json copied to ``json_out`` when asked."""
    from distml.drift.detectors import make_river_detector

    make_river_detector(detector)  # an unknown name fails before any work
    report = monitor(ref, input_path, out_dir, registry=registry, label_column=labels,
                     gate=gate, detector=detector, trust=trust)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_out, report)
    report["out_dir"] = str(out_dir)
    return report


def print_summary(console: Any, r: dict[str, Any]) -> None:
    drifted = r["drifted_features"]
    console.print(f"{r['rows']:,} rows against {r['model']}:{r['version']}: "
                  f"{len(drifted)} drifted column(s){': ' + ', '.join(drifted) if drifted else ''};"
                  f" {_concept(r).replace('**', '').lower()}\n"
                  f"report: {Path(r['out_dir']) / 'report.md'}", highlight=False)
