"""Validate a Katib Experiment without Katib: its CRD preserves unknown fields (the API server
checks nothing), so the manifest is checked against the Go types it is decoded into
(``tests/k8s-crds/katib/*.go``: every field's JSON name and type, the fields without
``omitempty`` required, the enumerations' values) and against the rules Katib's admission
webhook applies (pkg/webhook/v1beta1/experiment/validator), written out below.

The trial template's TrainJob is validated against its own CRD by the caller.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from tests.helpers.k8s_schema import meta_errors

GO_DIR = Path(__file__).parents[1] / "k8s-crds" / "katib"
_STRUCT = re.compile(r"^type (\w+) struct \{\n(.*?)^\}", re.S | re.M)
_FIELD = re.compile(r"^\s*(?:(\w+)\s+)?([\w.*\[\]]+)\s+`json:\"([^\"]*)\"`", re.M)
_ENUM_TYPE = re.compile(r"^type (\w+) string$", re.M)
_CONST = re.compile(r"^\s*\w+\s+(\w+)\s*=\s*\"([^\"]*)\"", re.M)


@cache
def go_types() -> tuple[dict[str, list[tuple[str, str, bool]]], dict[str, set[str]]]:
    """Struct -> [(json name, Go type, required)] ('' name: inline), and enum -> values."""
    structs: dict[str, list[tuple[str, str, bool]]] = {}
    enums: dict[str, set[str]] = {}
    text = "\n".join(p.read_text() for p in sorted(GO_DIR.glob("*.go")))
    text = re.sub(r"//.*", "", text)
    for name, body in _STRUCT.findall(text):
        fields = []
        for field, gotype, tag in _FIELD.findall(body):
            json_name, *opts = tag.split(",")
            if json_name == "-":
                continue
            embedded = field == ""  # an embedded struct: its type is the "field"
            fields.append((json_name, gotype, not embedded and "omitempty" not in opts
                           and "inline" not in opts))
        structs[name] = fields
    for name in _ENUM_TYPE.findall(text):
        enums[name] = {v for t, v in _CONST.findall(text) if t == name}
    return structs, enums


def _short(gotype: str) -> str:
    return gotype.lstrip("*").split(".")[-1] if "." in gotype and not gotype.startswith(
        "[]") else gotype.lstrip("*")


def type_errors(value: Any, gotype: str, path: str) -> list[str]:
    """``value`` checked against Go type ``gotype`` (its JSON form)."""
    structs, enums = go_types()
    gotype = gotype.lstrip("*")
    scalar = {"string": str, "bool": bool, "int": int, "int32": int, "int64": int,
              "float64": (int, float)}
    if gotype.startswith("[]"):
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list ({gotype})"]
        return [e for i, v in enumerate(value) for e in type_errors(v, gotype[2:], f"{path}[{i}]")]
    if gotype.startswith("map[string]"):
        if not isinstance(value, dict):
            return [f"{path}: not a mapping ({gotype})"]
        return [e for k, v in value.items()
                for e in type_errors(v, gotype.removeprefix("map[string]"), f"{path}.{k}")]
    if gotype in scalar:
        ok = isinstance(value, scalar[gotype]) and not (
            gotype != "bool" and isinstance(value, bool))
        return [] if ok else [f"{path}: {value!r} is not a {gotype}"]
    if gotype in ("metav1.ObjectMeta",):
        return meta_errors({"metadata": value})
    if gotype == "metav1.Time":
        return [] if isinstance(value, str) else [f"{path}: not a time"]
    if gotype.startswith(("v1.", "unstructured.")):  # Kubernetes' own: checked elsewhere
        return [] if isinstance(value, dict) else [f"{path}: not an object ({gotype})"]
    name = _short(gotype)
    if name in enums or gotype.startswith("common.") and name in enums:
        return [] if value in enums[name] else [
            f"{path}: {value!r} is not a {name} ({', '.join(sorted(enums[name]))})"]
    if name in structs:
        return struct_errors(value, name, path)
    raise AssertionError(f"{path}: Go type {gotype} is unknown to this checker")


def _fields(struct: str) -> list[tuple[str, str, bool]]:
    """The struct's fields, the inline (embedded) ones' flattened in."""
    structs, _ = go_types()
    out = []
    for name, gotype, required in structs[struct]:
        if name == "":
            inner = _short(gotype)
            out += _fields(inner) if inner in structs else [
                ("apiVersion", "string", False), ("kind", "string", False)]  # TypeMeta
        else:
            out.append((name, gotype, required))
    return out


def struct_errors(value: Any, struct: str, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: {value!r} is not an object ({struct})"]
    fields = {name: (gotype, required) for name, gotype, required in _fields(struct)}
    errors = [f"{path}.{k}: unknown field of {struct}" for k in value if k not in fields]
    errors += [f"{path}.{k}: required by {struct}" for k, (_, req) in fields.items()
               if req and k not in value]
    for k, v in value.items():
        if k in fields:
            errors += type_errors(v, fields[k][0], f"{path}.{k}" if path else k)
    return errors


def experiment_errors(exp: dict[str, Any]) -> list[str]:
    """The Go types' errors, then the webhook's."""
    errors = struct_errors(exp, "Experiment", "")
    if exp.get("apiVersion") != "kubeflow.org/v1beta1" or exp.get("kind") != "Experiment":
        errors.append("apiVersion/kind: not kubeflow.org/v1beta1 Experiment")
    return errors + (webhook_errors(exp.get("spec", {})) if not errors else [])


def webhook_errors(spec: dict[str, Any]) -> list[str]:
    """What Katib's validating webhook refuses (validator.go: objective, algorithm, counts,
    parameters, trial template)."""
    errors = []
    objective = spec.get("objective") or {}
    if objective.get("type") not in ("minimize", "maximize"):
        errors.append("spec.objective.type must be minimize or maximize")
    if not objective.get("objectiveMetricName"):
        errors.append("spec.objective.objectiveMetricName is required")
    if not (spec.get("algorithm") or {}).get("algorithmName"):
        errors.append("spec.algorithm.algorithmName is required")
    counts = {k: spec.get(k) for k in ("parallelTrialCount", "maxTrialCount",
                                       "maxFailedTrialCount")}
    errors += [f"spec.{k} must be > 0" for k, v in counts.items() if v is not None and v <= 0]
    if counts["maxTrialCount"] is not None:
        errors += [f"spec.{k} must be <= maxTrialCount" for k in ("parallelTrialCount",
                   "maxFailedTrialCount") if (counts[k] or 0) > counts["maxTrialCount"]]
    return errors + _parameter_errors(spec.get("parameters")) + _template_errors(spec)


def _parameter_errors(parameters: list[dict[str, Any]] | None) -> list[str]:
    if not parameters:
        return ["spec.parameters must not be empty"]
    errors = []
    for i, p in enumerate(parameters):
        where, space = f"spec.parameters[{i}]", p.get("feasibleSpace") or {}
        if not p.get("name"):
            errors.append(f"{where}.name is required")
        kind = p.get("parameterType")
        if kind in ("double", "int"):
            if "list" in space or "min" not in space or "max" not in space:
                errors.append(f"{where}: {kind} takes min and max, no list")
            elif float(space["min"]) >= float(space["max"]):
                errors.append(f"{where}: min must be below max")
            elif kind == "int" and not all(re.fullmatch(r"-?\d+", space[k])
                                           for k in ("min", "max")):
                errors.append(f"{where}: int bounds must be integers")
        elif kind in ("categorical", "discrete"):
            if not space.get("list") or "min" in space or "max" in space:
                errors.append(f"{where}: {kind} takes a list, no min or max")
        else:
            errors.append(f"{where}.parameterType {kind!r} is not double, int, discrete or "
                          "categorical")
    return errors


def _template_errors(spec: dict[str, Any]) -> list[str]:
    template = spec.get("trialTemplate")
    if not template:
        return ["spec.trialTemplate is required"]
    errors = []
    if ("trialSpec" in template) == ("configMap" in template):
        errors.append("spec.trialTemplate needs exactly one of trialSpec and configMap")
    params = template.get("trialParameters") or []
    if not params:
        errors.append("spec.trialTemplate.trialParameters must not be empty")
    names = [p.get("name") for p in params]
    refs = [p.get("reference") for p in params]
    if len(set(names)) < len(names) or len(set(refs)) < len(refs):
        errors.append("spec.trialTemplate.trialParameters: names and references are unique")
    known = {p.get("name") for p in spec.get("parameters") or []}
    errors += [f"trialParameters {r!r} references no parameter" for r in refs if r not in known]
    text = repr(template.get("trialSpec", {}))
    used = set(re.findall(r"\$\{trialParameters\.([^}]+)\}", text))
    errors += [f"trialSpec lacks ${{trialParameters.{n}}}" for n in names if n not in used]
    errors += [f"trialSpec uses ${{trialParameters.{n}}}, which is not a trial parameter"
               for n in used - set(names)]
    job = template.get("trialSpec", {})
    if job and not (job.get("apiVersion") and job.get("kind")):
        errors.append("trialSpec needs apiVersion and kind")
    if job and (job.get("metadata") or {}).get("name"):
        errors.append("trialSpec.metadata.name is Katib's to set (the trial's name)")
    builtin = job.get("kind") in ("Job", "TFJob", "PyTorchJob", "XGBoostJob", "MPIJob")
    if job and not builtin and not (template.get("successCondition")
                                    and template.get("failureCondition")):
        errors.append(f"a {job.get('kind')} trial needs successCondition and failureCondition")
    if job and not builtin and not template.get("primaryPodLabels"):
        errors.append(f"a {job.get('kind')} trial needs primaryPodLabels (whose pod holds "
                      "the metrics)")
    return errors
