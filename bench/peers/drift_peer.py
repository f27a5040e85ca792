"""A drift peer run in its own virtual environment by bench/drift.py:
``python drift_peer.py PEER IN.npz OUT.json``.

``evidently``: Evidently's DataDriftPreset at its defaults (its legacy Report API, which
returns each column's verdict; the test per column is Evidently's own choice by size and
type). ``alibi_detect``: alibi-detect's TabularDrift (two-sample KS per numeric column,
chi-squared per categorical one, Bonferroni across columns, p_val 0.05) at its defaults.
``nannyml``: NannyML's CBPE estimate of accuracy per chunk.

IN.npz holds ``ref`` (the reference rows), ``discrete`` (indices of discrete columns) and
the jobs: ``batch_<i>`` (a test each: which columns drift) and ``stream_<i>`` with
``target_<i>`` and ``windows`` (the first window of the stream's prefix sizes in which the
target column is named, and what else was named then). For nannyml: ``ref_proba``,
``ref_y``, ``chunk_size`` and ``proba_<i>`` (analysis streams): the estimate per chunk.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def evidently_detector(ref: np.ndarray, discrete: list[int]):
    import pandas as pd
    from evidently.legacy.metric_preset import DataDriftPreset
    from evidently.legacy.pipeline.column_mapping import ColumnMapping
    from evidently.legacy.report import Report

    names = [f"c{j}" for j in range(ref.shape[1])]
    mapping = ColumnMapping(numerical_features=[n for j, n in enumerate(names)
                                                if j not in discrete],
                            categorical_features=[names[j] for j in discrete])
    ref_df = pd.DataFrame(ref, columns=names)

    def drifted(x: np.ndarray) -> list[int]:
        report = Report(metrics=[DataDriftPreset()])
        report.run(reference_data=ref_df, current_data=pd.DataFrame(x, columns=names),
                   column_mapping=mapping)
        table = next(m["result"] for m in report.as_dict()["metrics"]
                     if "drift_by_columns" in m["result"])
        return [j for j, n in enumerate(names) if table["drift_by_columns"][n]["drift_detected"]]

    return drifted


def alibi_detector(ref: np.ndarray, discrete: list[int]):
    from alibi_detect.cd import TabularDrift

    cd = TabularDrift(ref, p_val=0.05, categories_per_feature={j: None for j in discrete})

    def drifted(x: np.ndarray) -> list[int]:
        data = cd.predict(x)["data"]  # drift_type "batch": Bonferroni over the columns
        if not data["is_drift"]:
            return []
        return [int(j) for j in np.flatnonzero(np.asarray(data["p_val"]) < data["threshold"])]

    return drifted


def column_jobs(peer: str, f: np.lib.npyio.NpzFile) -> dict:
    ref, discrete = f["ref"], [int(j) for j in f["discrete"]]
    drifted = (evidently_detector if peer == "evidently" else alibi_detector)(ref, discrete)
    out: dict = {"batches": [], "streams": [], "seconds": []}
    for i in range(sum(k.startswith("batch_") for k in f.files)):
        t = time.perf_counter()
        out["batches"].append(drifted(f[f"batch_{i}"]))
        out["seconds"].append(time.perf_counter() - t)
    windows = [int(w) for w in f["windows"]] if "windows" in f.files else []
    for i in range(sum(k.startswith("stream_") for k in f.files)):
        stream, target = f[f"stream_{i}"], int(f[f"target_{i}"])
        found = None
        for w in windows:
            named = drifted(stream[:w])
            if target in named:
                found = {"delay": w, "named": named}
                break
        out["streams"].append(found)
    return out


def nannyml_jobs(f: np.lib.npyio.NpzFile) -> dict:
    import nannyml as nml
    import pandas as pd

    def frame(proba: np.ndarray, y: np.ndarray | None = None) -> pd.DataFrame:
        df = pd.DataFrame({"proba": proba, "pred": (proba > 0.5).astype(int)})  # as argmax
        if y is not None:
            df["y"] = y
        return df

    chunk = int(f["chunk_size"])
    est = nml.CBPE(y_pred_proba="proba", y_pred="pred", y_true="y", metrics=["accuracy"],
                   problem_type="classification_binary", chunk_size=chunk)
    est.fit(frame(f["ref_proba"], f["ref_y"]))
    out = []
    for i in range(sum(k.startswith("proba_") for k in f.files)):
        res = est.estimate(frame(f[f"proba_{i}"])).to_df()
        res = res[res[("chunk", "period")] == "analysis"]  # not the reference's own chunks
        values = res[("accuracy", "value")].to_numpy()
        out.append([float(v) for v in values])
    return {"estimates": out}


def main() -> None:
    peer, path, out = sys.argv[1:4]
    with np.load(path) as f:
        result = nannyml_jobs(f) if peer == "nannyml" else column_jobs(peer, f)
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
