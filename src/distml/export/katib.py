"""A Katib ``Experiment`` for a searched candidate: Katib samples the candidate's space and
runs each trial as the candidate's TrainJob, its values passed as ``--set`` overrides, its
validation metric read from the trainer's ``val-<metric>=<value>`` lines (the StdOut
collector). Katib's CRD preserves unknown fields, so the API server checks nothing here:
the tests validate the Experiment against Katib's Go types and its webhook's rules.

Optuna's names map onto Katib's: samplers tpe, random and grid keep theirs, qmc is ``sobol``
and gp ``bayesianoptimization``; the median pruner is Katib's ``medianstop`` early stopping,
and Katib has no pruner for the others (successive halving and hyperband are its
algorithms, not early stopping): their experiments run without early stopping.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from distml.config import METRIC_HIGHER_IS_BETTER, Candidate
from distml.config.search import ChoiceSpace, IntSpace, LogUniformSpace, SearchConfig
from distml.export import kubernetes
from distml.export.plan import ExportPlan

logger = logging.getLogger(__name__)

ALGORITHMS = {"tpe": "tpe", "random": "random", "grid": "grid", "qmc": "sobol",
              "gp": "bayesianoptimization"}
# Katib's random suffix of a trial's name ("<experiment>-<8 characters>"), the TrainJob's.
TRIAL_SUFFIX = 9
# The TrainJob's pods: Katib reads metrics from node 0's container, and judges the trial by
# the TrainJob's conditions (a kind it does not know needs both conditions given).
PRIMARY_POD_LABELS = {"jobset.sigs.k8s.io/replicatedjob-name": kubernetes.RUNTIME_JOB,
                      "batch.kubernetes.io/job-completion-index": "0"}
SUCCESS = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'


def parameter_name(key: str) -> str:
    """A space key as a Katib parameter name (``model.hidden_sizes`` -> model-hidden-sizes)."""
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parameters(search: SearchConfig) -> list[dict[str, Any]]:
    """The space as Katib parameters (choices of lists as their JSON text)."""
    out = []
    for key, space in search.space.items():
        if isinstance(space, ChoiceSpace):
            kind, feasible = "categorical", {"list": [_text(v) for v in space.choice]}
        elif isinstance(space, IntSpace):
            low, high = space.int_
            kind, feasible = "int", {"min": str(low), "max": str(high), "step": str(space.step)}
            if space.log:
                feasible["distribution"] = "logUniform"
        else:
            low, high = space.bounds()
            kind, feasible = "double", {
                "min": repr(low), "max": repr(high),
                "distribution": "logUniform" if isinstance(space, LogUniformSpace)
                else "uniform"}
        out.append({"name": parameter_name(key), "parameterType": kind,
                    "feasibleSpace": feasible})
    return out


def trial_spec(plan: ExportPlan, cand: Candidate, *, image: str, device: str
               ) -> dict[str, Any]:
    """The candidate's TrainJob with the trial's values as ``--set`` overrides; Katib names
    it after the trial."""
    index = plan.cfg.train.candidates.index(cand)
    assert cand.search is not None
    overrides = [a for key in cand.search.space for a in (
        "--set", f"train.candidates.{index}.{key}=${{trialParameters.{parameter_name(key)}}}")]
    job = kubernetes.trainjob(plan, cand.name, image=image, device=device, name="trial",
                              args=[plan.config_in_image, "--candidate", cand.name,
                                    "--metric-lines", *overrides])
    del job["metadata"]["name"]  # Katib's: the trial's name
    return job


def experiment(plan: ExportPlan, cand: Candidate, *, image: str, device: str
               ) -> dict[str, Any]:
    """The Katib Experiment searching ``cand``'s space."""
    search = cand.search
    assert search is not None
    name = kubernetes.trainjob_name(plan, cand.name)
    kubernetes.check_trainjob_name(name + "x" * TRIAL_SUFFIX, plan.layouts[cand.name])
    metric = plan.cfg.metric
    spec: dict[str, Any] = {
        "objective": {"type": "maximize" if METRIC_HIGHER_IS_BETTER[metric] else "minimize",
                      "objectiveMetricName": f"val-{metric}",
                      "metricStrategies": [{"name": f"val-{metric}", "value":
                                            "max" if METRIC_HIGHER_IS_BETTER[metric]
                                            else "min"}]},
        "algorithm": {"algorithmName": ALGORITHMS[search.sampler],
                      **({"algorithmSettings": [{"name": "random_state", "value": str(
                          plan.cfg.seed if search.seed is None else search.seed)}]}
                         if search.sampler in ("tpe", "random") else {})},
        "parallelTrialCount": min(search.max_concurrent_trials or 3, search.num_trials),
        "maxTrialCount": search.num_trials,
        "maxFailedTrialCount": search.num_trials,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
        "parameters": parameters(search),
        "trialTemplate": {
            "primaryContainerName": kubernetes.RUNTIME_CONTAINER,
            "primaryPodLabels": dict(PRIMARY_POD_LABELS),
            "successCondition": SUCCESS, "failureCondition": FAILURE,
            "trialParameters": [{"name": parameter_name(k), "reference": parameter_name(k),
                                 "description": f"train.candidates[{cand.name}].{k}"}
                                for k in search.space],
            "trialSpec": trial_spec(plan, cand, image=image, device=device),
        },
    }
    if search.pruner == "median":
        spec["earlyStopping"] = {"algorithmName": "medianstop"}
    elif search.pruner != "none":
        logger.warning("candidate %s: Katib has no %s pruner; its Experiment runs without "
                       "early stopping", cand.name, search.pruner)
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment",
            "metadata": {"name": name,
                         "labels": kubernetes.labels(plan, candidate=plan.candidates[cand.name])},
            "spec": spec}
