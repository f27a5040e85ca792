"""Kubernetes objects for a config: Kubeflow Trainer TrainJobs, a KServe InferenceService, and
the shared volume, config and permissions they use. The Argo Workflow is in ``argo.py``.

Every object is a plain dict in the shape of its upstream CRD (``tests/k8s-crds``), which the
tests validate it against. Two ways to run what they describe:

- the Argo Workflow runs the whole pipeline in one run folder on the shared volume:
  ``distml stage ingest`` writes it, each candidate's TrainJob trains into it
  (``--run-dir``), ``distml stage select`` selects and registers, and the InferenceService
  is applied;
- ``trainjob-<candidate>.yaml`` alone trains one candidate: given the config, its rank 0
  starts a new run folder on the volume and ingests, as ``torchrun -m distml.train CONFIG``
  does on any cluster.
"""

from __future__ import annotations

from typing import Any

import yaml

from distml.errors import ConfigError
from distml.export.plan import MOUNT, REGISTRY, ExportPlan, NodeLayout

PVC = "distml-data"  # the shared volume's claim
SERVICE_ACCOUNT = "distml-workflow"
TOKEN_SECRET = "distml-serve-token"  # kubectl create secret generic ... --from-literal=token=
TORCH_RUNTIME = "torch-distributed"  # Kubeflow Trainer's stock ClusterTrainingRuntime
# The torch runtime's replicated job and its container (both "node"): runtimePatches name them.
RUNTIME_JOB = RUNTIME_CONTAINER = "node"
PATCH_MANAGER = "distml.io/export"
SERVE_CONTAINER = "kserve-container"  # the name KServe gives a custom predictor's container
SERVE_PORT = 8080  # KServe's default port for a custom predictor
USER_ID = 1000  # the Dockerfile's USER; fsGroup lets it write on the volume

CPU_PER_PROCESS = 2  # cores per training rank (and OMP_NUM_THREADS: a rank's threads)
MEMORY_PER_PROCESS_GI = 4
# Pod hostnames are "<trainjob>-node-<job>-<index>" and must be DNS labels (63 characters).
_HOSTNAME_MAX = 63


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config, manifests inside the Workflow) as readable blocks;
    no YAML anchors for objects used twice (kubectl reads them, people trip on them)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data,
                                   style="|" if "\n" in data else None)


_Dumper.add_representer(str, _represent_str)


def to_yaml(*objects: dict[str, Any]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)


def labels(plan: ExportPlan, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "distml", "app.kubernetes.io/part-of": plan.name,
            **{f"distml.io/{k}": v for k, v in extra.items()}}


def volume(*, read_only: bool = False) -> dict[str, Any]:
    claim: dict[str, Any] = {"claimName": PVC}
    if read_only:
        claim["readOnly"] = True
    return {"name": PVC, "persistentVolumeClaim": claim}


def config_volume(plan: ExportPlan) -> dict[str, Any]:
    return {"name": "config", "configMap": {"name": f"{plan.name}-config"}}


def mounts(plan: ExportPlan) -> list[dict[str, Any]]:
    """The shared volume, and the config file where the image has the project (so relative
    paths in it resolve as they do on the machine that exported it)."""
    return [{"name": PVC, "mountPath": MOUNT},
            {"name": "config", "mountPath": plan.config_in_image, "subPath": "config.yaml",
             "readOnly": True}]


def trainjob_name(plan: ExportPlan, candidate: str, *, prefix: str | None = None) -> str:
    return f"{prefix or plan.name}-{plan.candidates[candidate]}"


def check_trainjob_name(name: str, layout: NodeLayout) -> None:
    """JobSet names each pod "<name>-node-0-<index>": keep that a valid hostname."""
    longest = len(f"{name}-{RUNTIME_JOB}-0-{layout.num_nodes - 1}")
    if longest > _HOSTNAME_MAX:
        raise ConfigError(
            f"TrainJob name {name!r} is too long: its pods would be named with {longest} "
            f"characters, over Kubernetes' {_HOSTNAME_MAX}; shorten the config's name or the "
            "candidate's")


def trainjob(plan: ExportPlan, candidate: str, *, image: str, device: str, name: str,
             args: list[str]) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob running ``torchrun -m distml.train ARGS`` on the
    candidate's nodes. The torch runtime gives torchrun its nodes, processes per node, node
    rank and master through PET_* variables, so none is set here (its webhook refuses them)."""
    layout = plan.layouts[candidate]
    nproc = layout.procs_per_node
    restarts = ["--max-restarts", str(layout.max_restarts)] if layout.max_restarts else []
    pod_spec = {
        "securityContext": {"fsGroup": USER_ID},
        "volumes": [volume(), config_volume(plan)],
        "containers": [{"name": RUNTIME_CONTAINER, "volumeMounts": mounts(plan)}],
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": labels(plan, candidate=plan.candidates[candidate])},
        "spec": {
            "runtimeRef": {"name": TORCH_RUNTIME},
            "trainer": {
                "image": image,
                "command": ["torchrun", *restarts, "-m", "distml.train", *args],
                "numNodes": layout.num_nodes,
                "numProcPerNode": nproc,
                "resourcesPerNode": node_resources(nproc, device=device),
                "env": [{"name": "OMP_NUM_THREADS", "value": str(CPU_PER_PROCESS)}],
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": RUNTIME_JOB,
                    "template": {"spec": {"template": {"spec": pod_spec}}},
                }]}}},
            }],
        },
    }


def node_resources(nproc: int, *, device: str) -> dict[str, Any]:
    """CPU and memory for ``nproc`` ranks; on CUDA one GPU each (rank r uses cuda:r)."""
    amounts = {"cpu": str(nproc * CPU_PER_PROCESS),
               "memory": f"{nproc * MEMORY_PER_PROCESS_GI}Gi"}
    limits = dict(amounts)
    if device == "cuda":
        limits["nvidia.com/gpu"] = str(nproc)
    return {"requests": amounts, "limits": limits}


def serve_command(plan: ExportPlan) -> list[str]:
    """``distml serve`` with the config's serve section, bound to every interface of the pod;
    the model is the production version of the registered name (else its newest)."""
    s = plan.cfg.serve
    return [
        "distml", "serve", plan.cfg.model_name, "--registry", "/mnt/models",
        "--host", "0.0.0.0", "--port", str(SERVE_PORT), "--replicas", str(s.replicas),
        "--batching" if s.dynamic_batching else "--no-batching",
        "--max-batch-size", str(s.max_batch_size), "--max-delay-ms", f"{s.max_delay_ms:g}",
        "--max-queue-rows", str(s.max_queue_rows), "--timeout-ms", f"{s.timeout_ms:g}",
        "--quantize", s.quantize,
    ]


def inference_service(plan: ExportPlan, *, image: str) -> dict[str, Any]:
    """A KServe InferenceService with ``distml serve`` as its custom predictor (Open Inference
    Protocol, v2). STORAGE_URI makes KServe mount the registry from the shared volume at
    /mnt/models; the bearer token comes from a Secret, never from this file."""
    replicas = plan.cfg.serve.replicas
    probe = {"httpGet": {"path": "/v2/health/ready", "port": SERVE_PORT},
             "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": SERVE_CONTAINER,
        "image": image,
        "command": serve_command(plan),
        "env": [
            {"name": "STORAGE_URI", "value": f"pvc://{PVC}/{REGISTRY.removeprefix(MOUNT + '/')}"},
            {"name": "PROTOCOL", "value": "v2"},
            {"name": "DISTML_SERVE_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}}},
        ],
        "ports": [{"name": "http1", "containerPort": SERVE_PORT, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/v2/health/live", "port": SERVE_PORT},
                          "initialDelaySeconds": 10},
        "resources": {"requests": {"cpu": str(replicas), "memory": f"{replicas}Gi"},
                      "limits": {"cpu": str(replicas), "memory": f"{2 * replicas}Gi"}},
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": plan.name, "labels": labels(plan)},
        "spec": {"predictor": {"minReplicas": 1, "containers": [container]}},
    }


def config_map(plan: ExportPlan) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{plan.name}-config", "labels": labels(plan)},
            "data": {"config.yaml": plan.config_text}}


def volume_claim(plan: ExportPlan) -> dict[str, Any]:
    """ReadWriteMany: a TrainJob's nodes and the serving pods use it at the same time, from
    different machines (NFS, CephFS, EFS, Filestore, Azure Files...)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": PVC, "labels": labels(plan)},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": "20Gi"}}}}


def rbac(plan: ExportPlan) -> list[dict[str, Any]]:
    """What the Workflow's pods may do: create and watch TrainJobs, apply the
    InferenceService, and report step results to Argo (workflowtaskresults)."""
    rules = [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
         "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
         "verbs": ["create", "get", "list", "watch", "patch", "update"]},
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
         "verbs": ["create", "patch"]},
    ]
    meta = {"name": SERVICE_ACCOUNT, "labels": labels(plan)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT}]},
    ]
