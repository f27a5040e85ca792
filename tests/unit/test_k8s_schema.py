"""The structural-schema translator and CEL walker the Kubernetes export tests rely on, on
small schemas with each Kubernetes extension (the vendored CRDs lack some: nullable,
embedded resources, OpenAPI 3.0's boolean exclusiveMinimum)."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from tests.helpers.k8s_rules import quantity, selector_errors
from tests.helpers.k8s_schema import CelStats, apply_defaults, to_json_schema, walk


def valid(node: dict, value: object) -> bool:
    return Draft202012Validator(to_json_schema(node)).is_valid(value)


OBJ = {"type": "object", "properties": {"a": {"type": "string"}}}


@pytest.mark.parametrize(("node", "value", "ok"), [
    (OBJ, {"a": "x"}, True),
    (OBJ, {"a": "x", "b": 1}, False),  # unknown field
    ({**OBJ, "x-kubernetes-preserve-unknown-fields": True}, {"b": 1}, True),
    ({"type": "object"}, {"b": 1}, False),  # no properties, not preserved: all pruned
    ({"type": "object", "additionalProperties": {"type": "integer"}}, {"b": 1}, True),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, {"b": "1"}, False),
    ({"x-kubernetes-int-or-string": True}, 8080, True),
    ({"x-kubernetes-int-or-string": True}, "http", True),
    ({"x-kubernetes-int-or-string": True}, 1.5, False),
    ({"type": "string"}, None, False),
    ({"type": "string", "nullable": True}, None, True),
    ({"type": "string", "enum": ["a"], "nullable": True}, None, True),
    ({"type": "integer", "format": "int32"}, 2**31, False),
    ({"type": "integer", "format": "int64"}, 2**31, True),
    ({"type": "integer"}, True, False),  # a bool is not an integer
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, 0, False),
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, 0.1, True),
    ({"type": "object", "x-kubernetes-embedded-resource": True,
      "x-kubernetes-preserve-unknown-fields": True}, {"apiVersion": 1}, False),
    ({"type": "object", "anyOf": [{"properties": {"a": {"type": "string"}}}]}, {}, True),
])
def test_translation(node, value, ok):
    assert valid(node, value) is ok


def test_defaults_are_filled_in_before_validation_and_cel():
    node = {"type": "object", "properties": {
        "ref": {"type": "object", "properties": {"kind": {"type": "string", "default": "K"},
                                                 "name": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "self.kind == 'K'", "message": "kind"}]}}}
    value = apply_defaults(node, {"ref": {"name": "n"}})
    assert value == {"ref": {"name": "n", "kind": "K"}}
    stats = CelStats()
    assert walk(node, value, "", stats) == []
    assert stats.evaluated == 1


def test_cel_rules_pass_fail_and_are_counted():
    node = {"type": "integer", "x-kubernetes-validations": [
        {"rule": "self >= 1", "message": "at least 1"},
        {"rule": "self == oldSelf", "message": "immutable"},
        {"rule": "self.isSorted()", "message": "an extension function"}]}
    stats = CelStats()
    assert walk(node, 0, "n", stats) == ["n: at least 1 (rule: self >= 1)"]
    assert walk(node, 3, "n", stats) == []
    assert stats.as_dict() == {"evaluated": 2, "transition_rules_not_run_on_create": 2,
                               "skipped_unsupported": 2}


def test_a_cel_rule_that_errors_is_a_failure():
    node = {"type": "object", "x-kubernetes-validations": [
        {"rule": "self.missing == 1", "message": "reads a missing field"}]}
    assert walk(node, {}, "", CelStats()) == ["<root>: reads a missing field "
                                              "(rule: self.missing == 1)"]


def test_list_types():
    as_map = {"type": "array", "x-kubernetes-list-type": "map",
              "x-kubernetes-list-map-keys": ["name"], "items": {"type": "object"}}
    assert walk(as_map, [{"name": "a"}, {"name": "b"}], "l", CelStats()) == []
    assert walk(as_map, [{"name": "a"}, {"name": "a"}], "l", CelStats()) != []
    as_set = {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}
    assert walk(as_set, ["a", "a"], "l", CelStats()) != []


def test_quantities_and_selectors():
    assert [quantity(q) for q in ("500m", "2", 4, "1Gi")] == [0.5, 2.0, 4.0, 2.0**30]
    assert selector_errors("status.jobsStatus.0.succeeded > 0") == []
    assert selector_errors("status.phase == Succeeded,status.x != y") == []
    assert selector_errors("status.phase > Succeeded") != []
    assert selector_errors('status.conditions.#(type=="Complete").status == True') != []
