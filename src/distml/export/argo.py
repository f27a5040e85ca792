"""The pipeline as an Argo Workflow: a DAG ingest -> candidates in parallel -> select ->
deploy, every step in one run folder on the shared volume.

    ingest              distml stage ingest CONFIG --run-dir RUN     (a pod)
    train-<candidate>   a TrainJob: torchrun -m distml.train --run-dir RUN --candidate NAME
    select              distml stage select RUN                      (a pod)
    deploy              kubectl apply of the InferenceService

RUN is ``<volume>/runs/<name>/<workflow name>``: Argo names each submitted Workflow
uniquely, so the steps of one submission agree on the folder without passing it around.
"""

from __future__ import annotations

from typing import Any

from distml.export.kubernetes import (
    SERVICE_ACCOUNT,
    USER_ID,
    config_volume,
    inference_service,
    labels,
    mounts,
    to_yaml,
    trainjob,
    volume,
)
from distml.export.plan import ExportPlan

WORKFLOW_NAME = "{{workflow.name}}"
# Argo's generateName appends 5 random characters to "<name>-".
GENERATED_SUFFIX = 6
INGEST_WORKERS = 4  # when the config leaves execution.num_workers to the CPU count

# Argo evaluates these as label selectors over the object's JSON (gjson paths of label-key
# characters only). The torch runtime has one replicated job, "node", so jobsStatus.0 is it.
TRAINJOB_SUCCEEDED = "status.jobsStatus.0.succeeded > 0"
TRAINJOB_FAILED = "status.jobsStatus.0.failed > 0"
# KServe's model status for the predictor. After an apply the previous revision's status may
# be read once before KServe updates it; the rollout itself is KServe's to finish.
ISVC_LOADED = "status.modelStatus.states.activeModelState == Loaded"
ISVC_FAILED = "status.modelStatus.transitionStatus == BlockedByFailedLoad"


def run_dir(plan: ExportPlan) -> str:
    return f"{plan.run_root}/{WORKFLOW_NAME}"


def train_task(plan: ExportPlan, candidate: str) -> str:
    return f"train-{plan.candidates[candidate]}"


def sample_trainjob_name(plan: ExportPlan, candidate: str) -> str:
    """The name a TrainJob gets once Argo fills in the workflow's name (same length)."""
    return f"{'x' * (len(plan.name) + GENERATED_SUFFIX)}-{plan.candidates[candidate]}"


def workflow(plan: ExportPlan, *, image: str, device: str) -> dict[str, Any]:
    trains = [train_task(plan, c) for c in plan.candidates]
    tasks = [{"name": "ingest", "template": "ingest"}]
    tasks += [{"name": t, "template": t, "dependencies": ["ingest"]} for t in trains]
    tasks += [{"name": "select", "template": "select", "dependencies": trains},
              {"name": "deploy", "template": "deploy", "dependencies": ["select"]}]
    templates = [
        {"name": "pipeline", "dag": {"tasks": tasks}},
        _ingest_template(plan, image=image),
        *(_train_template(plan, c, image=image, device=device) for c in plan.candidates),
        _container_template(plan, "select", image=image, cpu=2,
                            command=["distml", "stage", "select", run_dir(plan)]),
        _deploy_template(plan, image=image),
    ]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": f"{plan.name}-", "labels": labels(plan)},
        "spec": {
            "entrypoint": "pipeline",
            "serviceAccountName": SERVICE_ACCOUNT,
            "securityContext": {"fsGroup": USER_ID},
            "volumes": [volume(), config_volume(plan)],
            "podGC": {"strategy": "OnPodSuccess"},
            "templates": templates,
        },
    }


def _container_template(plan: ExportPlan, name: str, *, image: str, cpu: int,
                        command: list[str]) -> dict[str, Any]:
    amounts = {"cpu": str(cpu), "memory": f"{2 * cpu}Gi"}
    return {"name": name, "container": {
        "image": image, "command": command, "volumeMounts": mounts(plan),
        "resources": {"requests": amounts, "limits": amounts}}}


def _ingest_template(plan: ExportPlan, *, image: str) -> dict[str, Any]:
    command = ["distml", "stage", "ingest", plan.config_in_image, "--run-dir", run_dir(plan)]
    workers = plan.cfg.execution.num_workers
    if workers is None:  # the CPU count a pod sees is its node's, not its limit
        workers = INGEST_WORKERS
        command += ["--set", f"execution.num_workers={workers}"]
    return _container_template(plan, "ingest", image=image, cpu=workers, command=command)


def _train_template(plan: ExportPlan, candidate: str, *, image: str,
                    device: str) -> dict[str, Any]:
    job = trainjob(plan, candidate, image=image, device=device,
                   name=f"{WORKFLOW_NAME}-{plan.candidates[candidate]}",
                   args=["--run-dir", run_dir(plan), "--candidate", candidate])
    job["metadata"]["labels"]["distml.io/workflow"] = WORKFLOW_NAME
    return {"name": train_task(plan, candidate), "resource": {
        "action": "create",
        "setOwnerReference": True,  # deleting the Workflow deletes its TrainJobs
        "successCondition": TRAINJOB_SUCCEEDED,
        "failureCondition": TRAINJOB_FAILED,
        "manifest": to_yaml(job),
    }}


def _deploy_template(plan: ExportPlan, *, image: str) -> dict[str, Any]:
    service = inference_service(plan, image=image)
    # A new annotation value per run rolls out new pods, which resolve the registry's
    # production version afresh (the serving pods read it when they start).
    service["spec"]["predictor"]["annotations"] = {"distml.io/workflow": WORKFLOW_NAME}
    return {"name": "deploy", "resource": {
        "action": "apply",
        "successCondition": ISVC_LOADED,
        "failureCondition": ISVC_FAILED,
        "manifest": to_yaml(service),
    }}
