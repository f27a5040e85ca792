"""Rules no CRD schema holds: they live in upstream admission webhooks and controllers (or in
the core API's pod validation), or are distml's own. Each says where it comes from and why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

import yaml

from tests.helpers.k8s_schema import CRD_DIR, LABEL_KEY, LABEL_VALUE

# Kubeflow Trainer's torch plugin (pkg/runtime/framework/plugins/torch, Validate) refuses a
# TrainJob that sets these: it sets them itself, from numNodes, numProcPerNode, the pod's
# completion index and the JobSet's first pod, and torchrun reads them as its flags.
RESERVED_BY_TRAINER = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                       "PET_MASTER_PORT"}
# distml's rule, beyond the webhook: torchrun reads every PET_<FLAG> as the default of its
# --<flag> (another would silently change the launch), and it sets these for each worker it
# starts (a value in the pod is overwritten, or misleads distml's runtime if torchrun is not
# the launcher).
SET_BY_TORCHRUN = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                   "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                   "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_RESTART_COUNT",
                   "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"}
_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10,
           "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_SELECTOR_OPS = ("==", "!=", ">", "<", "=")
_ARGO_GLOBALS = {"workflow.name", "workflow.namespace", "workflow.uid",
                 "workflow.serviceAccountName"}
_STORAGE_SCHEMES = ("pvc://", "s3://", "gs://", "http://", "https://", "hf://", "oci://")


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "2", 4, "8Gi") as a number."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


@cache
def torch_runtime() -> dict[str, Any]:
    """The stock torch-distributed ClusterTrainingRuntime, its Helm directives dropped."""
    text = (CRD_DIR / "torch-distributed-runtime.yaml").read_text()
    return yaml.safe_load("\n".join(ln for ln in text.splitlines() if "{{" not in ln))


def pod_volume_errors(pod: dict[str, Any], path: str, *, volumes: Iterable[str] = ()) -> list[str]:
    """The core API's pod validation: every volumeMount names a volume of the pod."""
    have = {v.get("name") for v in pod.get("volumes", [])} | set(volumes)
    return [f"{path}.containers[{c.get('name')}].volumeMounts: {m.get('name')!r} is not a "
            "volume of the pod" for c in pod.get("containers", [])
            for m in c.get("volumeMounts", []) if m.get("name") not in have]


def _env_names(env: list[dict[str, Any]]) -> set[str]:
    return {e.get("name", "") for e in env}


def trainjob_errors(job: dict[str, Any]) -> list[str]:
    trainer = job.get("spec", {}).get("trainer", {})
    names = _env_names(trainer.get("env", []))
    errors = []
    if reserved := sorted(names & RESERVED_BY_TRAINER):  # upstream webhook
        errors.append(f"spec.trainer.env: must not have reserved envs {reserved} (Trainer's "
                      "torch plugin sets them)")
    torchrun = {n for n in names if n.startswith("PET_") or n in SET_BY_TORCHRUN}
    if torchrun - RESERVED_BY_TRAINER:  # distml
        errors.append(f"spec.trainer.env: {sorted(torchrun - RESERVED_BY_TRAINER)} are torchrun's "
                      "to set (PET_* are its flags; the rest it sets per worker)")
    command = trainer.get("command", [])
    if command[:1] != ["torchrun"]:  # distml
        errors.append(f"spec.trainer.command {command[:3]}: the torch runtime's PET_* reach "
                      "only torchrun; without it every node trains alone")
    errors += _nproc_errors(trainer)
    errors += _runtime_errors(job.get("spec", {}))
    return errors


def _nproc_errors(trainer: dict[str, Any]) -> list[str]:
    """distml: numProcPerNode against the node's resources. Upstream's torch plugin derives
    the count from the CPUs only for numProcPerNode "auto" and trusts an explicit number, so
    a job asking for more ranks than it has cores (or GPUs) oversubscribes its node unseen:
    each gloo rank wants at least a core; each CUDA rank uses its own GPU (cuda:LOCAL_RANK)."""
    nproc = trainer.get("numProcPerNode", 1)
    res = trainer.get("resourcesPerNode", {})
    amounts = {**res.get("requests", {}), **res.get("limits", {})}  # limits win, as upstream
    gpus = [k for k in amounts if "gpu" in k.lower()]  # upstream's test for a GPU resource
    if gpus:
        have, what = quantity(amounts[gpus[0]]), gpus[0]
    elif "cpu" in amounts:
        have, what = quantity(amounts["cpu"]), "cpu"
    else:
        return [f"spec.trainer.resourcesPerNode: no cpu or GPU for numProcPerNode={nproc}"]
    if have < nproc:
        return [f"spec.trainer.numProcPerNode={nproc} is more than the node's {what} "
                f"({amounts[what]}): one per process at least"]
    return []


def _runtime_errors(spec: dict[str, Any]) -> list[str]:
    """Trainer's controller: the runtime must exist (else the TrainJob fails), and a runtime
    patch can only patch the runtime's replicated jobs and containers (a patch naming an
    unknown container adds one without an image, which the pod validation refuses)."""
    runtime = torch_runtime()
    ref = spec.get("runtimeRef", {})
    if (ref.get("name"), ref.get("kind", "ClusterTrainingRuntime")) != (
            runtime["metadata"]["name"], runtime["kind"]):
        return [f"spec.runtimeRef {ref}: no such runtime (distml targets "
                f"{runtime['kind']} {runtime['metadata']['name']})"]
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    errors = []
    for patch in spec.get("runtimePatches", []):
        patched = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
        for job in patched.get("replicatedJobs", []):
            if job.get("name") not in jobs:
                errors.append(f"spec.runtimePatches: replicated job {job.get('name')!r} is not "
                              f"in the runtime ({sorted(jobs)})")
                continue
            pod = job.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            base = jobs[job["name"]]["template"]["spec"]["template"]["spec"]
            known = {c["name"] for c in base["containers"]}
            errors += [f"spec.runtimePatches: container {c.get('name')!r} is not in the "
                       f"runtime's job {job['name']!r} ({sorted(known)})"
                       for c in pod.get("containers", []) if c.get("name") not in known]
            errors += pod_volume_errors(pod, "spec.runtimePatches",
                                        volumes=(v["name"] for v in base.get("volumes", [])))
    return errors


def inference_service_errors(isvc: dict[str, Any]) -> list[str]:
    errors = []
    name = isvc.get("metadata", {}).get("name", "")
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):  # KServe's webhook
        errors.append(f"metadata.name {name!r}: an InferenceService name must be a DNS-1035 "
                      "label (it becomes a host name)")
    predictor = isvc.get("spec", {}).get("predictor", {})
    containers = predictor.get("containers", [])
    main = next((c for c in containers if c.get("name") == "kserve-container"), None)
    if main is None:  # KServe: a custom predictor's container is "kserve-container"
        return [*errors, "spec.predictor.containers: no container named kserve-container"]
    errors += _serving_container_errors(main)
    return errors + pod_volume_errors(predictor, "spec.predictor")


def _serving_container_errors(c: dict[str, Any]) -> list[str]:
    errors = []
    ports = [p.get("containerPort") for p in c.get("ports", [])]
    if len(ports) > 1:  # Knative (KServe's serverless mode) serves one port per container
        errors.append(f"kserve-container.ports {ports}: at most one port")
    for probe in ("readinessProbe", "livenessProbe"):  # Knative: probes hit that port
        port = c.get(probe, {}).get("httpGet", {}).get("port")
        if port is not None and ports and port != ports[0]:
            errors.append(f"kserve-container.{probe}: port {port} is not the container's "
                          f"port {ports[0]}")
    env = {e.get("name"): e for e in c.get("env", [])}
    uri = env.get("STORAGE_URI", {}).get("value", "")
    if uri and not uri.startswith(_STORAGE_SCHEMES):  # KServe's storage initializer
        errors.append(f"kserve-container.env STORAGE_URI {uri!r}: unsupported scheme")
    if env.get("PROTOCOL", {}).get("value") == "v2":  # distml: the v2 health route
        path = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
        if path != "/v2/health/ready":
            errors.append(f"kserve-container.readinessProbe path {path!r}: the v2 protocol's "
                          "readiness route is /v2/health/ready")
    token = env.get("DISTML_SERVE_TOKEN")
    command = c.get("command", []) + c.get("args", [])
    if "0.0.0.0" in command and (token is None or "secretKeyRef" not in token.get(
            "valueFrom", {})):  # distml: a token from a Secret, never written in a manifest
        errors.append("kserve-container: distml serve on 0.0.0.0 needs DISTML_SERVE_TOKEN "
                      "from a secretKeyRef")
    return errors


def _dag_errors(template: dict[str, Any], names: set[str]) -> list[str]:
    tasks = template["dag"].get("tasks", [])
    by_name = {t.get("name"): t for t in tasks}
    errors = [f"dag {template['name']}: duplicate task names"] if len(by_name) < len(tasks) else []
    for t in tasks:
        if t.get("template") not in names:
            errors.append(f"dag task {t.get('name')!r}: template {t.get('template')!r} not found")
        errors += [f"dag task {t.get('name')!r}: dependency {d!r} not found"
                   for d in t.get("dependencies", []) if d not in by_name]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def cyclic(name: str) -> bool:
        if state.get(name) == 1:
            return True
        if state.get(name) == 2 or name not in by_name:
            return False
        state[name] = 1
        found = any(cyclic(d) for d in by_name[name].get("dependencies", []))
        state[name] = 2
        return found

    if any(cyclic(n) for n in by_name):
        errors.append(f"dag {template['name']}: dependency cycle")
    return errors


def selector_errors(expr: str) -> list[str]:
    """Argo parses successCondition/failureCondition as label selectors: KEY OP VALUE joined by
    commas, keys label-key shaped (gjson paths of those characters only)."""
    errors = []
    for req in expr.split(","):
        m = re.match(r"^\s*(\S+?)\s*(==|!=|>|<|=)\s*(\S+)\s*$", req)
        if not m:
            errors.append(f"condition {req!r}: not KEY OP VALUE")
            continue
        key, op, value = m.groups()
        if not re.match(LABEL_KEY, key) or not re.match(LABEL_VALUE, value):
            errors.append(f"condition {req!r}: key or value is not label-selector syntax")
        elif op in "<>" and not value.lstrip("-").isdigit():
            errors.append(f"condition {req!r}: {op} needs an integer")
    return errors


def workflow_errors(wf: dict[str, Any]) -> list[str]:
    """Argo's controller validation (what `argo lint` reports)."""
    spec = wf.get("spec", {})
    templates = spec.get("templates", [])
    names = {t.get("name") for t in templates}
    errors = [] if spec.get("entrypoint") in names else [
        f"spec.entrypoint {spec.get('entrypoint')!r}: no such template"]
    volumes = {v.get("name") for v in spec.get("volumes", [])}
    for t in templates:
        if "dag" in t:
            errors += _dag_errors(t, names)
        if "container" in t:
            errors += pod_volume_errors({"containers": [t["container"]]},
                                        f"template {t['name']}", volumes=volumes)
        resource = t.get("resource", {})
        for key in ("successCondition", "failureCondition"):
            if key in resource:
                errors += selector_errors(resource[key])
    for ref in set(re.findall(r"\{\{\s*([^}]*?)\s*\}\}", yaml.safe_dump(wf))):
        if ref not in _ARGO_GLOBALS:
            errors.append(f"{{{{{ref}}}}}: not a variable Argo can resolve here")
    return errors


def errors(obj: dict[str, Any]) -> list[str]:
    rules = {"TrainJob": trainjob_errors, "InferenceService": inference_service_errors,
             "Workflow": workflow_errors}.get(obj.get("kind", ""))
    return rules(obj) if rules else []
