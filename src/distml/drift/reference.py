"""What drift monitoring compares against, recorded when the model is selected:
``reference.json`` next to ``spec.json`` in the artifact (plain JSON, never unpickled).

- per input column, what a two-sample test needs to be exact, taken from the training split
  as the model sees it (after the fitted preprocessing): a numeric column with at most
  ``MAX_DISCRETE`` distinct values keeps every value and its exact count (a discrete
  column: chi-squared on the counts); any other numeric column keeps a seeded uniform sample
  of ``SAMPLE_ROWS`` rows without replacement (what a reservoir sample keeps), its standard
  deviation and the true row count (a continuous column: two-sample KS against the sample,
  normed Wasserstein distance as the effect size); categorical (one-hot encoded) columns
  keep their category counts;
- the model's predictions on the held-out rows (the test split: no selection step ranked
  candidates or stopped training on it): predicted class counts (or a sample of the
  predicted values for regression);
- for classifiers, on the same held-out rows: a histogram of the margin (top-2 probability
  difference), from which margin density follows for any threshold, and the error count,
  the supervised detectors' reference; and the probabilities' calibration (temperature
  scaling fitted on the validation split, see ``performance``) for label-free accuracy
  estimation.

Values are taken after standardize/minmax/clip/impute: what the model sees is what matters
to it. They are stored as the shortest decimal that reads back to the same float32, so
discrete values match new data exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distml.data import transforms
from distml.data.dataset import Manifest, read_partition
from distml.drift.columns import onehot_categories
from distml.drift.detectors import MarginReference, margins
from distml.drift.performance import fit_calibration
from distml.errors import ArtifactError
from distml.fsutil import write_text_atomic
from distml.tasks import predict

logger = logging.getLogger(__name__)

REFERENCE = "reference.json"
FORMAT_VERSION = 2  # 2: samples and exact counts (1: 101 quantiles, invalid KS)
MAX_DISCRETE = 64  # at most this many distinct values: keep them all (exact sketch)
SAMPLE_ROWS = 5000  # else a uniform sample of this many rows (KS is exact for its size)
SAMPLE_SEED = 0
MAX_CATEGORIES = 100  # the most frequent categories; the rest are counted as "other"
MAX_ROWS = 200_000  # training rows sketched, from partitions spread over the split


def _f32(values: np.ndarray) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(np.format_float_positional(v, unique=True, trim="-"))
            for v in np.asarray(values, dtype=np.float32)]


def numeric_sketch(values: np.ndarray, *, seed: int = SAMPLE_SEED) -> dict[str, Any]:
    """Every value and its count (few distinct values: a discrete column), else a seeded
    uniform sample of ``SAMPLE_ROWS`` values, their standard deviation and the true count."""
    values = np.asarray(values, dtype=np.float32)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        raise ValueError("cannot sketch a column with no values")
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) <= MAX_DISCRETE:
        return {"kind": "numeric", "discrete": True, "rows": len(values),
                "values": _f32(uniq), "counts": counts.tolist()}
    rng = np.random.default_rng(seed)
    sample = values if len(values) <= SAMPLE_ROWS else rng.choice(
        values, SAMPLE_ROWS, replace=False)
    return {"kind": "numeric", "discrete": False, "rows": len(values),
            "std": float(np.std(values.astype(np.float64))),
            "sample": _f32(np.sort(sample))}


def categorical_sketch(categories: list[str], counts: np.ndarray, other: int = 0
                       ) -> dict[str, Any]:
    """Category counts in the given order; past MAX_CATEGORIES only the most frequent are
    kept (still in order) and the rest are counted as other."""
    counts = np.asarray(counts, dtype=np.int64)
    keep = np.sort(np.argsort(-counts, kind="stable")[:MAX_CATEGORIES])
    return {"kind": "categorical", "rows": int(counts.sum()) + other,
            "categories": [str(categories[i]) for i in keep],
            "counts": [int(counts[i]) for i in keep],
            "other": int(counts.sum() - counts[keep].sum()) + other}


def onehot_columns(preprocessing: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Raw categorical column -> its training categories, from the fitted one-hot step."""
    out: dict[str, list[str]] = {}
    for p in preprocessing:
        if p["type"] == "onehot":
            out.update(zip(p["columns"], p["categories"], strict=True))
    return out


def onehot_levels(input_columns: dict[str, str], preprocessing: list[dict[str, Any]],
                  name: str, categories: list[str]) -> tuple[list[float], list[float]]:
    """What each ``name=category`` feature holds for a row of that category and for a row of
    none, after every fitted step (standardize after onehot moves them from 1 and 0)."""
    k = len(categories)
    raw: dict[str, np.ndarray] = {}
    for col, kind in input_columns.items():
        if col == name:
            raw[col] = np.array([*categories, "\0unseen"], dtype=object)
        elif kind == "categorical":
            raw[col] = np.array([""] * (k + 1), dtype=object)
        else:
            raw[col] = np.zeros(k + 1, dtype=np.float32)
    try:
        out = transforms.apply(preprocessing, raw)
        feats = [np.asarray(out[f"{name}={c}"], dtype=np.float32) for c in categories]
    except Exception as e:  # a user transform that cannot take made-up rows
        logger.warning("one-hot levels of %s after the transforms are unknown (%s); "
                       "assuming 1 and 0", name, e)
        return [1.0] * k, [0.0] * k
    return (_f32([f[j] for j, f in enumerate(feats)]), _f32([f[k] for f in feats]))


def column_map(input_columns: dict[str, str], feature_names: list[str],
               preprocessing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each monitored raw column and the model-input features it became.

    A numeric column keeps its name through the built-in transforms; a one-hot column
    becomes ``name=category`` features. Columns a user transform renamed are not monitored.
    """
    index = {n: j for j, n in enumerate(feature_names)}
    encoded = onehot_columns(preprocessing)
    out = []
    for name in input_columns:
        if name in encoded:
            cats = [str(c) for c in encoded[name]]
            feats = [f"{name}={c}" for c in cats]
            if all(f in index for f in feats):
                hot, cold = onehot_levels(input_columns, preprocessing, name, cats)
                out.append({"name": name, "kind": "categorical", "features": feats,
                            "categories": cats, "hot": hot, "cold": cold})
                continue
        elif name in index:
            out.append({"name": name, "kind": "numeric", "features": [name]})
            continue
        logger.warning("input column %s is not monitored: no model input feature keeps its "
                       "name (a user transform renamed it)", name)
    return out


def sketch_columns(columns: list[dict[str, Any]], feature_names: list[str], x: np.ndarray
                   ) -> list[dict[str, Any]]:
    index = {n: j for j, n in enumerate(feature_names)}
    out = []
    for col in columns:
        idx = [index[f] for f in col["features"]]
        if col["kind"] == "numeric":
            sketch = numeric_sketch(x[:, idx[0]])
        else:
            which, other = onehot_categories(x[:, idx], col)
            counts = np.bincount(which, minlength=len(idx))  # one per feature, in order
            sketch = {"kind": "categorical", "rows": len(x), "counts": counts.tolist(),
                      "other": other}
        out.append({**col, **sketch})
    return out


def _train_sample(manifest: Manifest, max_rows: int) -> np.ndarray:
    """Training rows, from partitions spread evenly over the split, up to ``max_rows``."""
    parts = manifest.partitions("train")
    total = sum(p["rows"] for p in parts)
    take = len(parts) if total <= max_rows else max(1, len(parts) * max_rows // total)
    chosen = np.unique(np.linspace(0, len(parts) - 1, take).round().astype(int))
    return np.concatenate([read_partition(manifest, parts[i]["path"])[0] for i in chosen])


Split = tuple[torch.Tensor, torch.Tensor]  # (x, y)


def build_reference(manifest: Manifest, model: torch.nn.Module, val: Split, held_out: Split,
                    *, max_rows: int = MAX_ROWS) -> dict[str, Any] | None:
    """The reference of a model trained on ``manifest``; None for language models.

    ``held_out``: rows no selection step ranked candidates or stopped training on (the
    test split): the predictions, margins and error count the detectors compare with.
    ``val``: the validation split, on which the probabilities' calibration is fitted.
    """
    if manifest.task == "language_modeling":
        return None
    columns = column_map(manifest.input_columns, manifest.feature_names, manifest.preprocessing)
    x = _train_sample(manifest, max_rows)
    held_x, held_y = held_out
    ref: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "task": manifest.task, "train_rows": len(x),
        "held_out_split": "test", "held_out_rows": len(held_x),
        "columns": sketch_columns(columns, manifest.feature_names, x),
    }
    out = predict(model, held_x)
    if manifest.task == "regression":
        ref["predictions"] = numeric_sketch(out.squeeze(-1).numpy())
        return ref
    probs = out.softmax(-1).numpy()
    pred = probs.argmax(-1)
    ref["predictions"] = categorical_sketch(
        list(manifest.classes), np.bincount(pred, minlength=len(manifest.classes)))
    ref["margin_histogram"] = list(MarginReference.from_margins(margins(probs)).counts)
    ref["held_out_errors"] = int((pred != held_y.numpy()).sum())
    val_probs = predict(model, val[0]).softmax(-1).numpy()
    ref["calibration"] = fit_calibration(val_probs, val[1].numpy(), probs, held_y.numpy())
    return ref


def write_reference(artifact_dir: Path, reference: dict[str, Any] | None) -> None:
    """Compact JSON, one line per column (a few hundred bytes each), renamed into place."""
    if reference is None:
        return
    head = {k: v for k, v in reference.items() if k != "columns"}
    columns = ",\n".join(json.dumps(c, separators=(",", ":")) for c in reference["columns"])
    text = json.dumps(head, separators=(",", ":"))[:-1] + f',"columns":[\n{columns}\n]}}\n'
    write_text_atomic(Path(artifact_dir) / REFERENCE, text)


def read_reference(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / REFERENCE
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} has no {REFERENCE} (it was not written by "
                            "distml run's select stage, or the training data is gone)")
    try:
        ref = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if ref.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {ref.get('format_version')!r} is not "
                            f"supported (this distml reads {FORMAT_VERSION})")
    return ref
