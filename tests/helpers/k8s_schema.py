"""Validate manifests against upstream CRDs without an API server.

What the API server does with a custom resource, and what is done here instead:

- its ``openAPIV3Schema`` (a Kubernetes *structural* schema, OpenAPI v3.0 flavoured) is
  translated into JSON Schema (2020-12) and checked with jsonschema. Unknown fields are
  rejected (the API server's strict field validation, ``kubectl apply`` by default) wherever
  the schema does not set ``x-kubernetes-preserve-unknown-fields``;
- ``default`` values are filled in first, as the API server defaults before it validates;
- ``x-kubernetes-validations`` CEL rules are evaluated with cel-python on each value they sit
  on. Rules reading ``oldSelf`` are transition rules, run only on updates: these manifests
  are created, so they are counted and not run. Rules calling a function cel-python lacks
  (Kubernetes' CEL extensions) are counted as skipped;
- ``x-kubernetes-list-type: map`` / ``set`` (no two items with the same keys / value);
- ``metadata`` is ObjectMeta, validated by the API server itself rather than by the CRD: the
  name rules (DNS subdomain), label keys and values are checked here.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import celpy.evaluation
import yaml
from jsonschema import Draft202012Validator

CRD_DIR = Path(__file__).parents[1] / "k8s-crds"
CRD_FILES = {
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "Workflow": "argoproj.io_workflows.yaml",
}

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
LABEL_KEY = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "generateName": {"type": "string", "maxLength": 248},
        "namespace": {"type": "string", "maxLength": 63, "pattern": f"^{_DNS_LABEL}$"},
        "labels": {"type": "object", "propertyNames": {"pattern": LABEL_KEY},
                   "additionalProperties": {"type": "string", "pattern": LABEL_VALUE}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}

_COPIED = ("type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum",
           "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties",
           "multipleOf", "required")
_INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# CEL macros (parsed, not looked up as functions) and what cel-python implements.
_CEL_MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}
_CEL_FUNCTIONS = _CEL_MACROS | {k for k in celpy.evaluation.base_functions if k.isidentifier()}


def to_json_schema(node: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """One structural-schema node as JSON Schema. ``strict``: objects take no fields beyond
    their ``properties`` (off inside anyOf/allOf/oneOf/not, which only restrict values)."""
    out = _value_keywords(node)
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = to_json_schema(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(n, strict=False) for n in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"], strict=False)
    _kubernetes_extensions(node, out)
    if node.get("nullable"):
        _allow_null(out)
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if (strict and not preserve and node.get("type") == "object"
            and "additionalProperties" not in node):
        out["additionalProperties"] = False
    return out


def _value_keywords(node: dict[str, Any]) -> dict[str, Any]:
    out = {k: node[k] for k in _COPIED if k in node}
    for bound, key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:  # OpenAPI 3.0's boolean form
            out[bound] = out.pop(key)
    if out.get("type") == "integer" and node.get("format") in _INT_BOUNDS:
        low, high = _INT_BOUNDS[node["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    return out


def _kubernetes_extensions(node: dict[str, Any], out: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):  # a whole object: apiVersion, kind, ...
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})


def _allow_null(out: dict[str, Any]) -> None:
    if "type" in out:
        out["type"] = [out["type"], "null"]
    elif "anyOf" in out:
        out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill in ``default`` for absent properties, recursively (the API server's defaulting)."""
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = node.get("additionalProperties")
        for key in list(value):
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(node["items"], v) for v in value]
    return value


@dataclass
class CelStats:
    """How many CEL rule evaluations ran, and how many were not run and why."""

    evaluated: int = 0
    transition: int = 0  # read oldSelf: update-only rules
    unsupported: int = 0  # call a function cel-python lacks
    unsupported_rules: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, int]:
        return {"evaluated": self.evaluated, "transition_rules_not_run_on_create":
                self.transition, "skipped_unsupported": self.unsupported}


@cache
def _program(expr: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expr))


def _unsupported(expr: str) -> set[str]:
    called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", expr))
    return called - _CEL_FUNCTIONS


def _check_rule(rule: dict[str, Any], value: Any, path: str, stats: CelStats) -> str | None:
    expr = rule["rule"]
    if re.search(r"\boldSelf\b", expr):
        stats.transition += 1
        return None
    if _unsupported(expr):
        stats.unsupported += 1
        stats.unsupported_rules.add(expr)
        return None
    stats.evaluated += 1
    try:
        result = _program(expr).evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError as e:  # the API server rejects a rule that errors
        result = e
    if isinstance(result, celpy.celtypes.BoolType) and bool(result):
        return None
    return f"{path or '<root>'}: {rule.get('message', 'CEL rule failed')} (rule: {expr})"


def _list_type_errors(node: dict[str, Any], value: list[Any], path: str) -> list[str]:
    kind = node.get("x-kubernetes-list-type")
    if kind == "map":
        keys = node.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
    elif kind == "set":
        seen = [json.dumps(item, sort_keys=True) for item in value]
    else:
        return []
    dupes = sorted({str(s) for s in seen if seen.count(s) > 1})
    what = f"key {node.get('x-kubernetes-list-map-keys')}" if kind == "map" else "value"
    return [f"{path}: duplicate items with the same {what}: {', '.join(dupes)}"] if dupes else []


def walk(node: dict[str, Any], value: Any, path: str, stats: CelStats) -> list[str]:
    """CEL rules and list types on ``value`` and everything under it."""
    if value is None:
        return []
    errors = [e for rule in node.get("x-kubernetes-validations", [])
              if (e := _check_rule(rule, value, path, stats))]
    if isinstance(value, list):
        errors += _list_type_errors(node, value, path)
        if isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                errors += walk(node["items"], item, f"{path}[{i}]", stats)
    elif isinstance(value, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += walk(sub, item, f"{path}.{key}" if path else key, stats)
    return errors


class Crd:
    """One vendored CRD: its served version's schema, as JSON Schema and as-is (for CEL)."""

    def __init__(self, path: Path) -> None:
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
        self.group, self.version = doc["spec"]["group"], version["name"]
        self.kind = doc["spec"]["names"]["kind"]
        self.schema = version["schema"]["openAPIV3Schema"]
        js = to_json_schema(self.schema)
        js["properties"]["metadata"] = OBJECT_META
        js["properties"]["apiVersion"] = {"const": f"{self.group}/{self.version}"}
        js["properties"]["kind"] = {"const": self.kind}
        js["required"] = sorted({*js.get("required", []), "apiVersion", "kind", "metadata"})
        self.validator = Draft202012Validator(js)

    def errors(self, obj: dict[str, Any], stats: CelStats) -> list[str]:
        obj = apply_defaults(self.schema, copy.deepcopy(obj))
        found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
                 for e in self.validator.iter_errors(obj)]
        return found + walk(self.schema, obj, "", stats)


@cache
def crd(kind: str) -> Crd:
    return Crd(CRD_DIR / CRD_FILES[kind])


def meta_errors(obj: dict[str, Any]) -> list[str]:
    """ObjectMeta only: for the core objects (ConfigMap, PVC, RBAC), whose schemas are the
    API server's own and are not vendored."""
    return [f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in Draft202012Validator(OBJECT_META).iter_errors(obj.get("metadata"))]
