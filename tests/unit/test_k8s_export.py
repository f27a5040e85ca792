"""`distml export kubernetes`: the files it writes, each manifest validated against its
upstream CRD (schema, CEL rules) and the webhook-only rules, and mutated manifests that must
be refused. No cluster: see tests/helpers/k8s_schema.py for what stands in for the API server.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from distml.cli import app
from distml.errors import ConfigError
from distml.export import argo, kubernetes
from distml.export.plan import NodeLayout, load_plan
from distml.export.writer import export_kubernetes, manifests
from tests.helpers import k8s_rules
from tests.helpers.k8s_schema import CRD_FILES, CelStats, crd, meta_errors

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"
WORKFLOW_NAME = "digits-x7k2p"  # what Argo makes of generateName "digits-"


def parallel(key: str) -> str:
    return f"train.parallel.{key}"


DDP2 = [f"{parallel('strategy')}=ddp", f"{parallel('world_size')}=2"]


def read_docs(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(folder.glob("*.yaml"))}


def embedded(wf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifests the Workflow's resource steps create, as Argo fills them in."""
    return {t["name"]: yaml.safe_load(t["resource"]["manifest"].replace(
        "{{workflow.name}}", WORKFLOW_NAME)) for t in wf["spec"]["templates"] if "resource" in t}


# CEL rules of the vendored CRDs that call a function cel-python lacks, so they are not run
# on the manifests here. None today; a new CRD or manifest that needs one fails below until
# it is listed here (and the README says which rules go unchecked).
KNOWN_UNSUPPORTED_CEL: frozenset[str] = frozenset()


def problems(obj: dict[str, Any], stats: CelStats | None = None) -> list[str]:
    kind = obj.get("kind", "")
    stats = stats if stats is not None else CelStats()
    found = crd(kind).errors(obj, stats) if kind in CRD_FILES else meta_errors(obj)
    skipped = stats.unsupported_rules - KNOWN_UNSUPPORTED_CEL
    assert not skipped, f"{len(skipped)} CEL rule(s) not run (a function cel-python lacks): " \
        + "; ".join(sorted(skipped))
    return found + k8s_rules.errors(obj)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("k8s")
    export_kubernetes(DIGITS, out, overrides=DDP2, context=ROOT, image="reg.example/distml:1")
    return read_docs(out)


def test_export_writes_the_dockerfile_and_every_manifest(tmp_path):
    files = export_kubernetes(DIGITS, tmp_path / "k8s", context=ROOT)
    assert sorted(p.name for p in files) == [
        "Dockerfile", "Dockerfile.dockerignore", "configmap.yaml", "inferenceservice.yaml",
        "pvc.yaml", "rbac.yaml", "trainjob-cnn.yaml", "trainjob-mlp-wide.yaml",
        "trainjob-mlp.yaml", "workflow.yaml"]


def test_every_manifest_validates_against_its_crd_and_webhook_rules(exported):
    stats = CelStats()
    checked = {}
    for file, docs in exported.items():
        for doc in docs:
            checked[f"{file}:{doc['kind']}"] = problems(doc, stats)
    for name, doc in embedded(exported["workflow.yaml"][0]).items():
        checked[f"workflow.yaml:{name}:{doc['kind']}"] = problems(doc, stats)
    assert {k: v for k, v in checked.items() if v} == {}
    kinds = [k.rsplit(":", 1)[1] for k in checked]
    assert kinds.count("TrainJob") == 6
    assert kinds.count("InferenceService") == 2
    print(f"CEL rules: {stats.as_dict()}; not run: {sorted(stats.unsupported_rules)}")
    assert stats.unsupported == len(KNOWN_UNSUPPORTED_CEL & stats.unsupported_rules) == 0
    assert stats.evaluated >= 30
    assert stats.transition > 0


def test_multi_node_and_cuda_manifests_validate(exported):
    plan = load_plan(DIGITS, DDP2, context=ROOT)
    plan = dataclasses.replace(plan, layouts={c: NodeLayout("fsdp", 8, 4, 3)
                                              for c in plan.layouts})
    files = manifests(plan, image="reg.example/distml:1", device="cuda")
    job = files["trainjob-mlp.yaml"][0]
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 2)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    assert trainer["command"][:3] == ["torchrun", "--max-restarts", "3"]
    docs = [job, *embedded(files["workflow.yaml"][0]).values(), files["workflow.yaml"][0]]
    assert [problems(d) for d in docs] == [[]] * len(docs)


def test_trainjob_runs_the_candidate_on_the_configs_processes(exported):
    job = exported["trainjob-mlp.yaml"][0]
    assert job["metadata"]["name"] == "digits-mlp"
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "reg.example/distml:1"
    assert trainer["command"] == ["torchrun", "-m", "distml.train", "/app/examples/digits.yaml",
                                  "--candidate", "mlp"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 2)
    cpus = 2 * kubernetes.CPU_PER_PROCESS
    assert trainer["resourcesPerNode"]["limits"]["cpu"] == str(cpus)
    assert {"name": "OMP_NUM_THREADS", "value": str(kubernetes.CPU_PER_PROCESS)} in trainer["env"]
    # the runtime's own job and container get the volume and the config
    job_patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node = job_patch["replicatedJobs"][0]
    assert node["name"] == k8s_rules.torch_runtime()["spec"]["template"]["spec"][
        "replicatedJobs"][0]["name"]
    mounts = node["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {m["mountPath"] for m in mounts} == {"/mnt/distml", "/app/examples/digits.yaml"}


def test_num_nodes_comes_from_the_config(tmp_path):
    export_kubernetes(DIGITS, tmp_path, context=ROOT, overrides=[
        "train.parallel.strategy=ddp", "train.parallel.world_size=4",
        "train.parallel.num_nodes=2"])
    trainer = read_docs(tmp_path)["trainjob-cnn.yaml"][0]["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)


def test_world_size_must_split_evenly_over_nodes(tmp_path):
    with pytest.raises(ConfigError, match=r"world_size=3 does not divide over num_nodes=2"):
        export_kubernetes(DIGITS, tmp_path, context=ROOT, overrides=[
            "train.parallel.strategy=ddp", "train.parallel.world_size=3",
            "train.parallel.num_nodes=2"])


def test_inference_service_serves_the_registered_model_over_v2(tmp_path):
    export_kubernetes(DIGITS, tmp_path, context=ROOT, overrides=["serve.replicas=2"])
    isvc = read_docs(tmp_path)["inferenceservice.yaml"][0]
    (c,) = isvc["spec"]["predictor"]["containers"]
    cmd = c["command"]
    assert cmd[:3] == ["distml", "serve", "digits"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8080"
    assert c["ports"][0]["containerPort"] == 8080
    assert cmd[cmd.index("--replicas") + 1] == "2"
    assert c["resources"]["limits"]["cpu"] == "2"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    env = {e["name"]: e for e in c["env"]}
    assert env["DISTML_SERVE_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "distml-serve-token", "key": "token"}}
    assert env["STORAGE_URI"]["value"] == "pvc://distml-data/registry"
    assert cmd[cmd.index("--registry") + 1] == "/mnt/models"  # where KServe mounts it


def test_workflow_runs_ingest_candidates_select_deploy_in_one_run_folder(exported):
    wf = exported["workflow.yaml"][0]
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    tasks = {t["name"]: t.get("dependencies", []) for t in templates["pipeline"]["dag"]["tasks"]}
    trains = ["train-mlp", "train-mlp-wide", "train-cnn"]
    assert tasks == {"ingest": [], **dict.fromkeys(trains, ["ingest"]), "select": trains,
                     "deploy": ["select"]}
    run = "/mnt/distml/runs/digits/{{workflow.name}}"
    assert templates["ingest"]["container"]["command"][:6] == [
        "distml", "stage", "ingest", "/app/examples/digits.yaml", "--run-dir", run]
    assert templates["select"]["container"]["command"] == ["distml", "stage", "select", run]
    jobs = embedded(wf)
    for train in trains:
        command = jobs[train]["spec"]["trainer"]["command"]
        assert command[command.index("--run-dir") + 1] == run.replace("{{workflow.name}}",
                                                                       WORKFLOW_NAME)
        assert jobs[train]["metadata"]["name"] == f"{WORKFLOW_NAME}-{train[6:]}"
    assert jobs["deploy"]["kind"] == "InferenceService"
    assert templates["deploy"]["resource"]["action"] == "apply"


def test_config_map_holds_the_config_pointed_at_the_volume(exported):
    text = exported["configmap.yaml"][0]["data"]["config.yaml"]
    raw = yaml.safe_load(text)
    assert (raw["output_dir"], raw["registry"]) == ("/mnt/distml/runs", "/mnt/distml/registry")
    node = raw
    for key in parallel("world_size").split("."):  # the --set overrides are in it
        node = node[key]
    assert node == 2
    assert raw["train"]["candidates"][0]["name"] == "mlp"


def test_dockerfile_installs_cpu_torch_first_and_runs_as_the_pods_user(tmp_path):
    export_kubernetes(DIGITS, tmp_path / "k8s", context=ROOT)
    text = (tmp_path / "k8s" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(("ARG", "RUN", "COPY", "USER"))]
    torch_at = next(i for i, ln in enumerate(lines) if '"${TORCH_SPEC}"' in ln)
    project_at = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install \"/app"))
    assert torch_at < project_at
    assert "ARG TORCH_SPEC=torch==2.13.0" in lines
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    assert f"USER {kubernetes.USER_ID}" in lines
    ignore = (tmp_path / "k8s" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "registry", ".git"} <= set(ignore)


def test_the_export_folder_is_left_out_of_the_build_context(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    export_kubernetes(Path("examples/digits.yaml"), Path("deploy/k8s"))
    assert "deploy/k8s" in (tmp_path / "deploy/k8s/Dockerfile.dockerignore").read_text().split()


def _readme_export_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("### Kubernetes"):]
    block = block[:block.index("\n## ")]
    lines = block.replace("\\\n", " ").splitlines()  # continuation lines joined
    return [" ".join(ln.split()) for ln in lines if ln.startswith("distml export kubernetes")]


def test_readme_commands_run_as_shown(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    commands = _readme_export_commands()
    assert commands
    assert commands[0] == "distml export kubernetes examples/digits.yaml --out k8s/"
    for command in commands:
        result = CliRunner().invoke(app, command.split()[1:])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "k8s" / "workflow.yaml").is_file()
        assert all(problems(d) == [] for d in read_docs(tmp_path / "k8s")["workflow.yaml"])


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "tpu"], "--device 'tpu': use one of cpu, cuda"),
    (["--image", "my image"], "is not an image reference"),
    (["--set", "train.epochz=3"], "train.epochz"),
    (["--set", "name=This_Is_A_Very_Long_Pipeline_Name_For_Kubernetes_Pods_To_Carry"],
     "is too long"),
])
def test_bad_input_is_refused_naming_it(tmp_path, args, message):
    result = CliRunner().invoke(app, ["export", "kubernetes", str(DIGITS.relative_to(ROOT)),
                                      "--out", str(tmp_path), *args], catch_exceptions=False,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_a_config_outside_the_build_context_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="outside .* the folder the Dockerfile copies"):
        export_kubernetes(DIGITS, tmp_path / "k8s")


def test_candidate_names_that_collide_as_kubernetes_names_are_refused(tmp_path):
    raw = yaml.safe_load(DIGITS.read_text())
    raw["train"]["candidates"][1]["name"] = "MLP"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="collide as Kubernetes names"):
        load_plan(tmp_path / "c.yaml", [], context=tmp_path)


# ---------------------------------------------------------------------------------------------
# mutated manifests: each must be refused, for the reason given


def _env(m, *names):
    m["spec"]["trainer"]["env"] += [{"name": n, "value": "1"} for n in names]


def _pod(m):
    return m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _container(m):
    return m["spec"]["predictor"]["containers"][0]


def _tasks(m):
    return m["spec"]["templates"][0]["dag"]["tasks"]


MUTATIONS = {  # name: (file, mutate, what the refusal says)
    "trainjob numNodes as a string": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(numNodes="1"),
        "is not of type 'integer'"),
    "trainjob unknown field": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(gpus=1),
        "Additional properties are not allowed ('gpus'"),
    "trainjob missing runtimeRef": (
        "trainjob-mlp.yaml", lambda m: m["spec"].pop("runtimeRef"),
        "'runtimeRef' is a required property"),
    "trainjob numNodes over int32": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(numNodes=2**31),
        "is greater than the maximum of 2147483647"),
    "trainjob wrong apiVersion": (
        "trainjob-mlp.yaml", lambda m: m.update(apiVersion="trainer.kubeflow.org/v1"),
        "'trainer.kubeflow.org/v1alpha1' was expected"),
    "CEL: numProcPerNode 0": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(numProcPerNode=0),
        "numProcPerNode must be greater than or equal to 1"),
    "CEL: name not an RFC 1035 label": (
        "trainjob-mlp.yaml", lambda m: m["metadata"].update(name="9digits-mlp"),
        "metadata.name must match RFC 1035 DNS label format"),
    "CEL: name over 63 characters": (
        "trainjob-mlp.yaml", lambda m: m["metadata"].update(name="d" * 64),
        "metadata.name must be no more than 63 characters"),
    "CEL: managedBy someone else": (
        "trainjob-mlp.yaml", lambda m: m["spec"].update(managedBy="me.example/ctl"),
        "ManagedBy must be trainer.kubeflow.org/trainjob-controller"),
    "list-map: env name twice": (
        "trainjob-mlp.yaml", lambda m: _env(m, "OMP_NUM_THREADS"),
        "duplicate items with the same key ['name']"),
    "webhook: reserved PET_MASTER_ADDR": (
        "trainjob-mlp.yaml", lambda m: _env(m, "PET_MASTER_ADDR"),
        "must not have reserved envs ['PET_MASTER_ADDR']"),
    "torchrun's WORLD_SIZE and PET_RDZV_BACKEND": (
        "trainjob-mlp.yaml", lambda m: _env(m, "WORLD_SIZE", "PET_RDZV_BACKEND"),
        "['PET_RDZV_BACKEND', 'WORLD_SIZE'] are torchrun's to set"),
    "more processes per node than CPUs": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(numProcPerNode=8),
        "numProcPerNode=8 is more than the node's cpu (4)"),
    "more processes per node than GPUs": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"]["resourcesPerNode"]["limits"]
        .update({"nvidia.com/gpu": "1"}), "more than the node's nvidia.com/gpu (1)"),
    "python without torchrun": (
        "trainjob-mlp.yaml", lambda m: m["spec"]["trainer"].update(
            command=["python", "-m", "distml.train"]), "PET_* reach only torchrun"),
    "patch of a container the runtime lacks": (
        "trainjob-mlp.yaml", lambda m: _pod(m)["containers"][0].update(name="trainer"),
        "container 'trainer' is not in the runtime's job 'node'"),
    "mount of an undeclared volume": (
        "trainjob-mlp.yaml", lambda m: _pod(m)["volumes"].pop(),
        "'config' is not a volume of the pod"),
    "isvc probe port a boolean": (
        "inferenceservice.yaml", lambda m: _container(m)["readinessProbe"]["httpGet"].update(
            port=True), "readinessProbe.httpGet.port: True is not valid under any"),
    "isvc container without a name": (
        "inferenceservice.yaml", lambda m: _container(m).pop("name"),
        "'name' is a required property"),
    "isvc unknown predictor field": (
        "inferenceservice.yaml", lambda m: m["spec"]["predictor"].update(replicas=2),
        "Additional properties are not allowed ('replicas'"),
    "isvc upper-case name": (
        "inferenceservice.yaml", lambda m: m["metadata"].update(name="Digits"),
        "must be a DNS-1035 label"),
    "isvc token written in the manifest": (
        "inferenceservice.yaml", lambda m: _container(m)["env"].__setitem__(
            2, {"name": "DISTML_SERVE_TOKEN", "value": "s3cret"}), "from a secretKeyRef"),
    "isvc readiness on a v1 route": (
        "inferenceservice.yaml", lambda m: _container(m)["readinessProbe"]["httpGet"].update(
            path="/v1/models/digits"), "readiness route is /v2/health/ready"),
    "isvc second port (Knative)": (
        "inferenceservice.yaml", lambda m: _container(m)["ports"].append(
            {"containerPort": 9090}), "at most one port"),
    "CEL: task with depends and dependencies": (
        "workflow.yaml", lambda m: _tasks(m)[1].update(depends="ingest"),
        "cannot use both 'depends' and 'dependencies'"),
    "CEL: template of two types": (
        "workflow.yaml", lambda m: m["spec"]["templates"][1].update(suspend={}),
        "template must have at most one template type"),
    "CEL: task name starting with a digit": (
        "workflow.yaml", lambda m: _tasks(m)[1].update(name="1-train"),
        "task name cannot begin with a digit"),
    "CEL: resource with manifest and manifestFrom": (
        "workflow.yaml", lambda m: m["spec"]["templates"][2]["resource"].update(
            manifestFrom={"artifact": {"name": "x"}}), "only one of manifest or manifestFrom"),
    "workflow unknown spec field": (
        "workflow.yaml", lambda m: m["spec"].update(templatez=[]),
        "Additional properties are not allowed ('templatez'"),
    "argo: task naming a missing template": (
        "workflow.yaml", lambda m: _tasks(m)[0].update(template="ingest2"),
        "template 'ingest2' not found"),
    "argo: dependency cycle": (
        "workflow.yaml", lambda m: _tasks(m)[0].update(dependencies=["deploy"]),
        "dependency cycle"),
    "argo: gjson query as a condition": (
        "workflow.yaml", lambda m: m["spec"]["templates"][2]["resource"].update(
            successCondition='status.conditions.#(type=="Complete").status == True'),
        "is not label-selector syntax"),
    "argo: unresolvable variable": (
        "workflow.yaml", lambda m: m["spec"]["templates"][1]["container"]["command"].append(
            "{{inputs.parameters.run}}"), "not a variable Argo can resolve"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_manifest_is_refused(exported, name):
    file, mutate, reason = MUTATIONS[name]
    original = exported[file][0]
    assert problems(original) == []
    mutated = copy.deepcopy(original)
    mutate(mutated)
    found = problems(mutated)
    assert any(reason in p for p in found), f"{name}: expected {reason!r} in {found}"


def test_the_workflow_conditions_read_the_fields_the_crds_have():
    """The success/failure conditions name status fields the TrainJob and InferenceService
    CRDs define (a typo would leave the step waiting forever)."""
    for condition, kind in [(argo.TRAINJOB_SUCCEEDED, "TrainJob"),
                            (argo.TRAINJOB_FAILED, "TrainJob"),
                            (argo.ISVC_LOADED, "InferenceService"),
                            (argo.ISVC_FAILED, "InferenceService")]:
        node = crd(kind).schema
        for part in condition.split()[0].split("."):
            node = node["items"] if part.isdigit() else node["properties"][part]
        assert node["type"] in ("integer", "string")


def test_the_new_commands_are_in_the_readme_cli_reference():
    readme = (ROOT / "README.md").read_text()
    groups = {g.name: g.typer_instance for g in app.registered_groups
              if g.name in ("export", "stage")}
    commands = [f"distml {n} {c.name}" for n, t in groups.items() for c in t.registered_commands]
    assert sorted(commands) == ["distml export kubernetes", "distml stage ingest",
                                "distml stage select"]
    assert [c for c in commands if c not in readme] == []
