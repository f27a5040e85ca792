"""``distml watch``: the continuous-training loop over a landing folder.

Every poll, the CSV/Parquet files that landed in the folder since the last one (a file is
taken once it is there under its final name: write it as ``.name`` and rename it in) make
one cycle, in its own folder ``<output_dir>/<name>/watch/cycles/NNNN/``:

1. **check**: the new files against production's reference (``distml monitor`` with the
   label column: a drifted column, or concept drift from the labels) -> ``drift/``;
   no drift (and ``monitor.watch.retrain: drift``): the files are done;
2. **train**: a run of the pipeline (``<output_dir>/<name>/<time>/``, report and tracking
   as ``distml run``) on the new files together with the ``window_files`` most recent older
   ones (the data source's files, then earlier landed files), the new files first, so
   their rows are the ingested chunks ``0 .. k-1``;
3. **select**: candidates ranked on the new files' validation rows, the best registered
   (never promoted by the select stage);
4. **promote**: the new version and production are scored on the new files' test rows
   (each through its own preprocessing, from the raw rows); ``production`` moves (with a
   reason in the registry's audit log) only if the new version is better. A server
   following ``name@production`` switches to it.

The state (``watch/state.json``, replaced atomically after every step) records the files
processed, the older files' history and the cycle under way with the step it reached, so
``distml watch`` after a crash goes on from there: a run that was training resumes its
candidates from their checkpoints; a registered version is not registered again (the
registry knows the run it came from).
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distml import storage
from distml.artifact import load_artifact
from distml.config import Config, FileSource, parse_config
from distml.data.dataset import Manifest, read_partition
from distml.data.tables import list_files, raw_columns, read_table
from distml.drift.columns import Gate
from distml.errors import ArtifactError, ConfigError, DistmlError
from distml.fsutil import write_json_atomic
from distml.registry import PRODUCTION, Registry
from distml.rundir import Project, RunDir
from distml.tasks import evaluate
from distml.trust import TrustPolicy
from distml.workflow.drift_report import monitor
from distml.workflow.pipeline import Chain, NullReporter, Reporter, Run, run_chain, start_run
from distml.workflow.promotion import promote, weigh

logger = logging.getLogger(__name__)

STATE = "state.json"
SUFFIXES = (".csv", ".parquet", ".pq")


def watch_dir(cfg: Config) -> Path:
    return Project.of(cfg).watch


def _source(cfg: Config) -> FileSource:
    if not isinstance(cfg.data.source, FileSource):
        raise ConfigError(f"distml watch retrains on landed files, so data.source must be a "
                          f"file source (a CSV/Parquet path); it is {cfg.data.source.type!r}")
    return cfg.data.source


def landed(landing: Path) -> list[Path]:
    """The complete files in the landing folder (hidden ones are still being written),
    oldest first."""
    if not landing.is_dir():
        raise DistmlError(f"--landing: {str(landing)!r} is not a folder")
    files = [f for f in landing.iterdir() if f.is_file() and not f.name.startswith(".")
             and f.suffix.lower() in SUFFIXES]
    return sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))


class Watcher:
    """One landing folder and the state of its loop. Not for two processes at once (a lock
    file refuses the second)."""

    def __init__(self, cfg: Config, landing: Path, *, reporter: Reporter | None = None,
                 retrain_always: bool = False, trust: TrustPolicy | None = None) -> None:
        # A landing prefix (s3://bucket/landing/) is mirrored into a local folder first.
        self.landing_url = storage.as_url(landing)
        self.cfg, self.landing = cfg, storage.local_path(landing).absolute()
        self.source = _source(cfg)
        self.reporter = reporter or NullReporter()
        self.always = retrain_always or cfg.monitor.watch.retrain == "always"
        self.trust = trust or TrustPolicy(trust_code=True)  # the user's own config's models
        self.dir = watch_dir(cfg)
        self.state = self._load()

    # -- state -------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        import json

        path = self.dir / STATE
        if not path.is_file():
            history = [] if storage.as_url(str(self.source.path)) else [  # a remote source:
                str(f.absolute()) for f in list_files(Path(self.source.path))]  # landed only
            return {"landing": str(self.landing), "processed": [], "history": history,
                    "cycles": [], "cycle": None}
        try:
            state = json.loads(path.read_text())
        except ValueError as e:
            raise DistmlError(f"{path} is damaged ({e}); move it away to start over") from None
        if state["landing"] != str(self.landing) and state["landing"] != self.landing_url:
            raise DistmlError(f"{self.dir} watches {state['landing']}, not {self.landing}; "
                              "give that --landing, or another output_dir or name")
        return state

    def _save(self) -> None:
        write_json_atomic(self.dir / STATE, self.state)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DistmlError(f"another distml watch is running on {self.dir}") from None
            yield

    # -- the loop ----------------------------------------------------------------------------

    def poll(self) -> dict[str, Any] | None:
        """Finish an interrupted cycle, else run one on the files landed since; returns the
        cycle's summary (None: nothing new)."""
        with self._locked():
            if self.landing_url is not None:
                storage.mirror_objects(self.landing_url, self.landing, suffixes=SUFFIXES)
            if self.state["cycle"] is None:
                done = set(self.state["processed"])
                new = [f for f in landed(self.landing) if f.name not in done]
                if not new:
                    return None
                self._begin(new)
            return self._continue()

    def run(self, *, once: bool, on_cycle: Callable[[dict[str, Any]], None] = lambda c: None
            ) -> list[dict[str, Any]]:
        """Poll until interrupted (``once``: until nothing new is left)."""
        done = []
        while True:
            summary = self.poll()
            if summary is not None:
                done.append(summary)
                on_cycle(summary)
                continue
            if once:
                return done
            time.sleep(self.cfg.monitor.watch.poll_interval_s)

    def _begin(self, new: list[Path]) -> None:
        number = len(self.state["cycles"]) + 1
        old = [f for f in self.state["history"] if Path(f).is_file()]
        keep = self.cfg.monitor.watch.window_files
        window = old[-keep:] if keep else []
        self.state["cycle"] = {"number": number, "step": "pending",
                               "new": [str(f) for f in new], "window": window}
        logger.info("cycle %d: %d new file(s): %s", number, len(new),
                    ", ".join(f.name for f in new))
        self._save()

    def _continue(self) -> dict[str, Any]:
        cycle = self.state["cycle"]
        folder = self.dir / "cycles" / f"{cycle['number']:04d}"
        if cycle["step"] == "pending":
            cycle["drift"] = self._check(cycle, folder)
            cycle["step"] = "checked"
            self._save()
        if cycle["step"] != "done" and not (cycle["drift"]["retrain"] or self.always):
            cycle["outcome"] = "no drift: production kept, not retrained"
            cycle["step"] = "done"
        if cycle["step"] != "done":
            self._retrain(cycle, folder)
        return self._finish(cycle)

    def _finish(self, cycle: dict[str, Any]) -> dict[str, Any]:
        names = [Path(f).name for f in cycle["new"]]
        self.state["processed"] += names
        self.state["history"] += cycle["new"]
        self.state["cycles"].append(cycle)
        self.state["cycle"] = None
        self._save()
        logger.info("cycle %d: %s", cycle["number"], cycle["outcome"])
        return cycle

    # -- steps -------------------------------------------------------------------------------

    def _check(self, cycle: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Drift of the new files against production's reference."""
        ref = f"{self.cfg.model_name}@{PRODUCTION}"
        try:
            Registry(self.cfg.registry).resolve(ref)
        except ArtifactError:
            return {"retrain": True, "why": f"no {ref} in the registry yet"}
        new = _linked(folder / "new", cycle["new"])
        labels = self.source.label_column if self.cfg.data.task == "classification" else None
        d = self.cfg.monitor.drift
        report = monitor(ref, new, folder / "drift", registry=self.cfg.registry,
                         label_column=labels, gate=Gate(**d.model_dump()), trust=self.trust)
        drift = bool(report["drifted_features"]) or bool(report["concept_drift"])
        why = (f"drifted columns {report['drifted_features'][:10]}" if report["drifted_features"]
               else f"concept drift (from {report['concept_drift_from']})"
               if report["concept_drift"] else "no drift")
        return {"retrain": drift, "why": why, "version": report["version"],
                "drifted_features": report["drifted_features"],
                "concept_drift": report["concept_drift"], "report": str(folder / "drift")}

    def _retrain(self, cycle: dict[str, Any], folder: Path) -> None:
        data = _linked(folder / "data", cycle["new"] + cycle["window"])
        cfg = self._cycle_config(data)
        resume = "run_dir" in cycle
        if resume:
            run = Run(cfg, RunDir(Path(cycle["run_dir"])), self.reporter)
        else:
            run = start_run(cfg, reporter=self.reporter)
            cycle["run_dir"] = str(run.folder.path)
            cycle["step"] = "training"
            self._save()
        newest = len(cycle["new"])

        def rescore(results: list[dict[str, Any]], manifest: Manifest) -> None:
            for r in results:  # select on the new files' validation rows
                r["val_all"], r["val"] = r["val"], self._newest_val(r, manifest, newest)

        training = cycle["step"] == "training"
        out = run_chain(run, Chain(until="select" if training else "ingest", resume=resume,
                                   rescore=rescore))
        if training:
            assert out.selection is not None
            cycle["version"] = out.selection["registry"]["version"]
            cycle["selected"] = out.selection["best"]["name"]
            cycle["step"] = "registered"
            self._save()
        self._promote(cycle, out.manifest)

    def _cycle_config(self, data: Path) -> Config:
        raw = self.cfg.to_dict()
        raw["data"]["source"] = {**self.source.model_dump(mode="json"), "path": str(data)}
        raw["select"]["promote"] = False  # the loop decides, on the newest test rows
        return parse_config(raw, base_dir=Path.cwd())

    def _newest_val(self, result: dict[str, Any], manifest: Manifest, newest: int
                    ) -> dict[str, float]:
        """A candidate's validation metrics on the rows of the new files (chunks < newest)."""
        x, y = _rows(manifest, "val", newest)
        model = load_artifact(result["artifact"], trust=self.trust).model
        return evaluate(manifest.task, model, torch.from_numpy(x), torch.from_numpy(y))[0]

    def _promote(self, cycle: dict[str, Any], manifest: Manifest) -> None:
        """Move production to the new version only if it is better on the new test rows."""
        reg, name, metric = Registry(self.cfg.registry), self.cfg.model_name, self.cfg.metric
        ids = _row_ids(manifest, "test", len(cycle["new"]))
        raw, y = self._raw_rows(cycle["new"], ids)
        new = self._score(reg.get(name, cycle["version"]).path, raw, y)
        if new is None:
            raise DistmlError(f"{name}:{cycle['version']} cannot be scored on the new files")
        p = weigh(reg, name, cycle["version"], metric=metric, new=new,
                  score=lambda path: self._score(path, raw, y))
        cycle["newest_test"] = {"rows": len(ids), "metric": metric, "new": new,
                                "production": p.old, "production_version": p.current}
        if promote(reg, p, reason=(
                f"distml watch cycle {cycle['number']} ({cycle['drift']['why']}): "
                f"{metric} {new:.6g} on the new files' test rows"
                + ("" if p.old is None else f", production v{p.current}: {p.old:.6g}"))):
            cycle["outcome"] = f"promoted {name}:{cycle['version']} to {PRODUCTION}"
        else:
            cycle["outcome"] = (f"kept {name}:{p.current} in {PRODUCTION} ({metric} "
                                f"{p.old:.6g} vs the new version's {new:.6g} on the new "
                                "files' test rows)")
        cycle["step"] = "done"

    def _raw_rows(self, files: list[str], ids: np.ndarray
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The raw columns and labels of rows ``ids`` of the new files, in their order (the
        ingested row ids of the first chunks are positions in them)."""
        tables = [read_table(Path(f)) for f in files]
        names = self.source.feature_columns or [
            c for c in tables[0].column_names if c != self.source.label_column]
        parts = [raw_columns(t, names) for t in tables]
        raw = {c: np.concatenate([p[c] for p in parts])[ids] for c in names}
        labels = np.concatenate([t[self.source.label_column].to_numpy(zero_copy_only=False)
                                 for t in tables])[ids]
        return raw, labels

    def _score(self, artifact_dir: Path, raw: dict[str, np.ndarray], labels: np.ndarray
               ) -> float | None:
        """The selection metric of a version on raw rows, through its own preprocessing."""
        artifact = load_artifact(artifact_dir, trust=self.trust)
        x = artifact.preprocess({c: raw[c] for c in artifact.spec["input_columns"]})
        if artifact.task == "classification":
            index = {c: i for i, c in enumerate(artifact.labels)}
            known = np.array([str(v) in index for v in labels])
            if not known.all():  # classes it never saw: it cannot be compared on these rows
                logger.warning("%s does not know the classes of %d new rows", artifact_dir,
                               int((~known).sum()))
                return None
            y = torch.tensor([index[str(v)] for v in labels], dtype=torch.int64)
        else:
            y = torch.from_numpy(labels.astype(np.float32))
        return evaluate(artifact.task, artifact.model, x, y)[0][self.cfg.metric]


def _linked(folder: Path, files: list[str]) -> Path:
    """``folder`` holding links to ``files``, named so they sort in the given order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        link = folder / f"{i:04d}-{Path(f).name}"
        if not link.is_symlink():
            link.symlink_to(Path(f).absolute())
    return folder


def _chunk(rel_path: str) -> int:
    """The source chunk (file) a partition came from: ``split/part-CCCCC-KKK.parquet``."""
    return int(Path(rel_path).name.split("-")[1])


def _row_ids(manifest: Manifest, split: str, chunks: int) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [p["path"] for p in manifest.partitions(split) if _chunk(p["path"]) < chunks]
    if not parts:
        raise DistmlError(f"the new files have no {split} rows; land larger files")
    return np.concatenate([pq.read_table(manifest.root / p, columns=["row_id"])["row_id"]
                           .to_numpy() for p in parts])


def _rows(manifest: Manifest, split: str, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_partition(manifest, p["path"]) for p in manifest.partitions(split)
             if _chunk(p["path"]) < chunks]
    if not parts:
        raise DistmlError(f"the new files have no {split} rows; land larger files")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
