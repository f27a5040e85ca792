"""The search of one candidate, on the driver: Optuna asks for trials, the executor runs
them as work items (``max_concurrent_trials`` at a time), Optuna is told their outcomes.

Each slot is a thread that asks the study for a trial, runs it on the executor (one work
item, so the engine places it: a pool process, a Dask or Ray worker) and tells the outcome,
until ``num_trials`` trials have finished or the time budget is spent. The study lives in
an RDB storage, so a search killed midway goes on under ``distml run --resume``: finished
trials count and are never run again; a trial the kill interrupted is recorded as failed
(reason: interrupted) and its values are tried again by a new trial.

The best completed trial becomes the candidate: its artifact is copied to
``candidates/<name>/artifact`` and its result, with the list of trials, to
``candidates/<name>/result.json``, so selection, teachers and reports see a candidate.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from distml.config import METRIC_HIGHER_IS_BETTER, Candidate, Config
from distml.config.search import SearchConfig
from distml.errors import DistmlError
from distml.execution import Executor, make_executor
from distml.rundir import RunDir
from distml.search.space import (
    decode,
    distributions,
    grid_size,
    make_pruner,
    make_sampler,
    open_storage,
    shown_url,
    storage_url,
)
from distml.search.trial import TrialJob, run_trial, trial_name

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the search stopped while it ran (its values are tried again)"
_STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
           "failed": TrialState.FAIL}


@dataclass
class _Search:
    """The shared state of the slots of one search."""

    cfg: Config
    cand: Candidate
    run: RunDir
    study: optuna.Study
    url: str
    total: int
    deadline: float | None
    threads: int
    executor: Callable[[], Executor]
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0

    def next_trial(self) -> optuna.trial.Trial | None:
        """Ask for a trial, or None when the budget (trials, time) is spent."""
        with self.lock:
            if self.started >= self.total or (
                    self.deadline is not None and time.monotonic() > self.deadline):
                return None
            self.started += 1
            return self.study.ask(distributions(self.cand.search))

    def run_one(self, trial: optuna.trial.Trial) -> None:
        values = decode(self.cand.search, trial.params)
        job = TrialJob(str(self.run.path), self.cand.name, trial.number, trial._trial_id,
                       self.study.study_name, self.url, values, self.threads)
        try:
            (outcome,) = self.executor().map(run_trial, [job], desc="trial",
                                             describe=lambda j: j.name)  # the map ends here
        except Exception as e:  # noqa: BLE001 - a dead worker fails the trial, not the search
            cause = e.__cause__ or e
            outcome = {"number": trial.number, "name": job.name, "values": values,
                       "state": "failed", "value": None, "evals": None, "start": None,
                       "curve": [], "host": None,
                       "end": time.time(), "reason": f"the worker died: {cause}"
                       if isinstance(cause, BrokenProcessPool) else str(e)}
        with self.lock:
            self._tell(trial, outcome)

    def _tell(self, trial: optuna.trial.Trial, outcome: dict[str, Any]) -> None:
        for key in ("name", "start", "end", "reason", "evals", "curve", "host"):
            trial.set_user_attr(key, outcome[key])
        state = _STATES[outcome["state"]]
        try:
            if state == TrialState.COMPLETE:
                self.study.tell(trial, outcome["value"])
            else:
                self.study.tell(trial, state=state)
        except RuntimeError as e:
            # The grid sampler stops the study when its grid is done, which Optuna allows
            # only inside study.optimize; the trial is told all the same (Optuna records
            # it before the sampler's hook), and the budget ends the search.
            if "Study.stop" not in str(e):
                raise
        logger.info("trial %s: %s%s", outcome["name"], outcome["state"],
                    f" ({outcome['reason']})" if outcome["reason"] else "")

    def slot(self) -> None:
        while (trial := self.next_trial()) is not None:
            self.run_one(trial)


class _Engine:
    """The executor the slots share, made again when a local pool broke (a killed worker
    breaks the whole pool; Dask and Ray replace their workers themselves)."""

    def __init__(self, cfg: Config, workers: int) -> None:
        self.cfg, self.workers = cfg, workers
        self.lock = threading.Lock()
        self.current = self._make()

    def _make(self) -> Executor:
        return make_executor(self.cfg.execution.executor, num_workers=self.workers, retries=0)

    def get(self) -> Executor:
        with self.lock:
            if _broken(self.current):
                self.current.close()
                self.current = self._make()
            return self.current

    def close(self) -> None:
        self.current.close()


def _broken(executor: Executor) -> bool:
    pool = getattr(executor, "_pool", None)
    return bool(pool is not None and getattr(pool, "_broken", False))


def concurrency(cfg: Config, cand: Candidate) -> int:
    search = cand.search
    assert search is not None
    return search.max_concurrent_trials or cfg.execution.num_workers or os.cpu_count() or 1


def open_study(cfg: Config, cand: Candidate, run: RunDir) -> tuple[optuna.Study, str]:
    search = cand.search
    assert search is not None
    url = storage_url(search, run.path, cand.name)
    direction = "maximize" if METRIC_HIGHER_IS_BETTER[cfg.metric] else "minimize"
    seed = cfg.seed if search.seed is None else search.seed
    study = optuna.create_study(
        study_name=f"{cfg.name}.{run.name}.{cand.name}", storage=open_storage(url),
        sampler=make_sampler(search, seed=seed), pruner=make_pruner(search),
        direction=direction, load_if_exists=True)
    return study, url


def _recover(study: optuna.Study) -> int:
    """Trials a killed search left running are failed (interrupted) and their values
    queued again; returns how many trials had finished before."""
    finished = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "reason", INTERRUPTED)
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
            logger.info("trial %d was interrupted; its values are queued again", t.number)
        elif t.state.is_finished() and t.user_attrs.get("reason") != INTERRUPTED:
            finished += 1
    return finished


def run_search(cfg: Config, cand: Candidate, run: RunDir) -> dict[str, Any]:
    """Search ``cand``'s space; returns its result (the best trial's, with the trials)."""
    search = cand.search
    assert search is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, url = open_study(cfg, cand, run)
    done = _recover(study)
    total = min(search.num_trials, grid_size(search) or search.num_trials)
    workers = concurrency(cfg, cand)
    engine = _Engine(cfg, workers)
    state = _Search(cfg, cand, run, study, url, total=total - done, threads=max(
        1, (os.cpu_count() or 1) // workers), executor=engine.get, deadline=None
        if search.timeout_s is None else time.monotonic() + search.timeout_s)
    try:
        slots = [threading.Thread(target=state.slot, name=f"trial-slot-{i}", daemon=True)
                 for i in range(workers)]
        for s in slots:
            s.start()
        for s in slots:
            s.join()
    finally:
        engine.close()
    return settle(cfg, cand, run, study, url)


def trial_rows(study: optuna.Study, search: SearchConfig) -> list[dict[str, Any]]:
    """summary.json's list of a study's trials (their values as the candidate takes
    them)."""
    return [{"number": t.number, "name": t.user_attrs.get("name"),
             "state": t.state.name.lower(), "value": t.value,
             "params": decode(search, t.params), "evals": t.user_attrs.get("evals"),
             "start": t.user_attrs.get("start"), "end": t.user_attrs.get("end"),
             "reason": t.user_attrs.get("reason"), "curve": t.user_attrs.get("curve", []),
             "host": t.user_attrs.get("host")}
            for t in study.get_trials(deepcopy=False)]


def settle(cfg: Config, cand: Candidate, run: RunDir, study: optuna.Study, url: str
           ) -> dict[str, Any]:
    """The best trial as the candidate: its artifact and result in the candidate's folder."""
    rows = trial_rows(study, cand.search)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        reasons = "; ".join(f"trial {r['number']}: {r['state']}"
                            + (f" ({r['reason']})" if r["reason"] else "") for r in rows)
        raise DistmlError(f"candidate {cand.name!r}: no trial of its search completed "
                          f"({reasons}); widen or fix train.candidates[].search.space")
    best = study.best_trial
    source = run.candidate(trial_name(cand.name, best.number))
    result = source.read_result()
    out = run.candidate(cand.name)
    out.path.mkdir(parents=True, exist_ok=True)
    tmp = out.path / ".artifact.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.artifact, tmp)
    shutil.rmtree(out.artifact, ignore_errors=True)
    tmp.rename(out.artifact)
    result.update(name=cand.name, artifact=str(out.artifact), search={
        "study": study.study_name, "storage": shown_url(url), "best_trial": best.number,
        "best_params": decode(cand.search, best.params), "trials": rows})
    out.write_result(result)
    return result
