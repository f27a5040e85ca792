"""Hypothesis strategies from the JSON schemas of an OpenAPI document: values that the schema
accepts, for the subset of keywords the serving document uses (type, properties, required,
items, minItems, minimum, enum, $ref, allOf, oneOf, additionalProperties, {} for any)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_SCALARS = {
    "string": st.text(max_size=8),
    "number": st.floats(-1e6, 1e6) | st.integers(-1000, 1000),
    "boolean": st.booleans(),
}
_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=4), max_leaves=20)


def from_schema(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy:
    if "$ref" in schema:
        *_, kind, name = schema["$ref"].split("/")
        return st.deferred(lambda: from_schema(doc["components"][kind][name], doc))
    if "allOf" in schema:  # the document uses allOf only to add a description to a $ref
        return from_schema(schema["allOf"][0], doc)
    if "oneOf" in schema:
        return st.one_of([from_schema(s, doc) for s in schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**40)), 2**40)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = from_schema(schema.get("items", {}), doc)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=4)
    if kind == "object":
        return _object(schema, doc)
    return _ANY  # {}: any JSON value


def _object(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy:
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    fixed = st.fixed_dictionaries(
        {k: from_schema(v, doc) for k, v in props.items() if k in required},
        optional={k: from_schema(v, doc) for k, v in props.items() if k not in required})
    extra = schema.get("additionalProperties")
    if not isinstance(extra, dict):
        return fixed
    more = st.dictionaries(st.text(max_size=8), from_schema(extra, doc), max_size=3)
    return st.tuples(fixed, more).map(lambda pair: {**pair[1], **pair[0]})
