"""`distml export kubernetes` of a searched candidate: a Katib Experiment, validated against
Katib's Go types (fields, required ones, enumerations) and its webhook's rules; its trial
TrainJob against the TrainJob CRD; its trial's overrides load as the candidate; mutated
manifests are refused."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from distml.config import load_config
from distml.export.writer import export_kubernetes
from tests.helpers import k8s_rules
from tests.helpers.k8s_schema import CelStats, crd
from tests.helpers.katib import experiment_errors, go_types

ROOT = Path(__file__).parents[2]
SEARCH = ROOT / "examples" / "search.yaml"


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("katib")
    export_kubernetes(SEARCH, out, context=ROOT, image="reg.example/distml:1")
    return yaml.safe_load((out / "experiment-mlp.yaml").read_text())


def sample(exp: dict[str, Any]) -> dict[str, str]:
    """A value per parameter, as Katib would put it in the template (the max, or the last
    of the list)."""
    return {p["name"]: p["feasibleSpace"].get("max") or p["feasibleSpace"]["list"][-1]
            for p in exp["spec"]["parameters"]}


def trial(exp: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The trial's TrainJob as Katib makes it: named after the trial, values filled in."""
    text = yaml.safe_dump(exp["spec"]["trialTemplate"]["trialSpec"])
    job = yaml.safe_load(re.sub(r"\$\{trialParameters\.([^}]+)\}",
                                lambda m: values[m.group(1)].replace("'", "''"), text))
    job["metadata"]["name"] = f"{exp['metadata']['name']}-x7k2pq9z"
    return job


def test_the_go_types_are_read():
    structs, enums = go_types()
    assert ("parallelTrialCount", "*int32", False) in structs["ExperimentSpec"]
    assert ("type", "ExperimentConditionType", True) in structs["ExperimentCondition"]
    assert enums["ParameterType"] == {"unknown", "double", "int", "discrete", "categorical"}


def test_the_experiment_validates_and_searches_the_candidates_space(exp):
    assert experiment_errors(exp) == []
    spec = exp["spec"]
    assert spec["objective"] == {"type": "maximize", "objectiveMetricName": "val-accuracy",
                                 "metricStrategies": [{"name": "val-accuracy",
                                                       "value": "max"}]}
    assert spec["algorithm"]["algorithmName"] == "tpe"
    assert spec["earlyStopping"] == {"algorithmName": "medianstop"}
    assert (spec["parallelTrialCount"], spec["maxTrialCount"]) == (2, 12)
    params = {p["name"]: p for p in spec["parameters"]}
    assert params["lr"]["feasibleSpace"] == {"min": "0.0001", "max": "0.1",
                                             "distribution": "logUniform"}
    assert params["model-hidden-sizes"]["feasibleSpace"]["list"] == ["[64]", "[256, 256]"]
    assert params["batch-size"]["parameterType"] == "int"


def test_a_trial_is_the_candidates_trainjob_with_its_values(exp):
    values = sample(exp)
    job = trial(exp, values)
    assert crd("TrainJob").errors(job, CelStats()) + k8s_rules.errors(job) == []
    command = job["spec"]["trainer"]["command"]
    assert command[:7] == ["torchrun", "-m", "distml.train", "/app/examples/search.yaml",
                           "--candidate", "mlp", "--metric-lines"]
    overrides = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    cand = load_config(SEARCH, overrides).train.candidate("mlp")  # as distml.train loads it
    assert (cand.lr, cand.batch_size, cand.model.hidden_sizes, cand.model.dropout) == (
        0.1, 128, [256, 256], 0.5)


def _drop(path: str):
    def mutate(exp: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = exp
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[int(last) if last.isdigit() else last]
    return mutate


def _set(path: str, value: Any):
    def mutate(exp: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = exp
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return mutate


MUTATIONS = {
    "unknown field": (_set("spec.parallelTrialCounts", 2), r"unknown field of ExperimentSpec"),
    "no objective metric": (_drop("spec.objective.objectiveMetricName"),
                            r"objectiveMetricName is required"),
    "objective type": (_set("spec.objective.type", "max"), r"is not a ObjectiveType"),
    "no algorithm": (_drop("spec.algorithm"), r"algorithmName is required"),
    "count as text": (_set("spec.maxTrialCount", "12"), r"'12' is not a int32"),
    "parallel over max": (_set("spec.parallelTrialCount", 20), r"must be <= maxTrialCount"),
    "parameter type": (_set("spec.parameters.0.parameterType", "float"),
                       r"'float' is not a ParameterType"),
    "bounds as numbers": (_set("spec.parameters.0.feasibleSpace.min", 0.0001),
                          r"is not a string"),
    "distribution": (_set("spec.parameters.0.feasibleSpace.distribution", "log"),
                     r"is not a Distribution"),
    "empty choice": (_set("spec.parameters.2.feasibleSpace.list", []),
                     r"categorical takes a list"),
    "min over max": (_set("spec.parameters.0.feasibleSpace.min", "1"), r"min must be below"),
    "unreferenced parameter": (_drop("spec.trialTemplate.trialParameters.0"),
                               r"not a trial parameter"),
    "no success condition": (_drop("spec.trialTemplate.successCondition"),
                             r"needs successCondition and failureCondition"),
    "trial named": (_set("spec.trialTemplate.trialSpec.metadata.name", "x"),
                    r"metadata.name is Katib's"),
    "retain as text": (_set("spec.trialTemplate.retain", "true"), r"is not a bool"),
    "no trial template": (_drop("spec.trialTemplate"), r"trialTemplate is required"),
    "bad name": (_set("metadata.name", "Digits_MLP"), r"metadata.name"),
    "condition without status": (_set("status", {"conditions": [{"type": "Created"}]}),
                                 r"status.conditions\[0\].status: required"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_mutated_experiment_is_refused(exp, name):
    mutate, reason = MUTATIONS[name]
    mutated = copy.deepcopy(exp)
    mutate(mutated)
    found = experiment_errors(mutated)
    assert any(re.search(reason, e) for e in found), found
