"""The feedback route's body: ids of infer requests and their true labels."""

from __future__ import annotations

import json

import pytest

from distml.serving.drift_feed import parse_feedback
from distml.serving.protocol import ProtocolError


def _parse(obj: object) -> tuple:
    return parse_feedback(json.dumps(obj).encode())


def test_a_label_per_request_or_a_list_per_row():
    labels, keys = _parse({"ids": ["a", "b"], "labels": ["3", [1, "7"]]})
    assert labels == ["3", 1, "7"]
    assert keys == [("a", 0), ("b", 0), ("b", 1)]


@pytest.mark.parametrize(("body", "match"), [
    ({"ids": ["a"]}, "labels: must be a list with one entry per id"),
    ({"ids": ["a"], "labels": ["1", "2"]}, r"one entry per id \(1\)"),
    ({"ids": [1], "labels": ["1"]}, "ids: must be a list of the requests' 'id' strings"),
    ({"ids": ["a"], "labels": [True]}, r"labels\[0\]: 'True' is not a class label"),
    ({"ids": ["a"], "labels": [[{"x": 1}]]}, r"labels\[0\]: .* is not a class label"),
    ({"ids": ["a"], "labels": ["1"], "extra": 1}, "an object with 'ids' and 'labels'"),
    ([1, 2], "an object with 'ids' and 'labels'"),
])
def test_a_wrong_body_is_a_400_naming_the_field(body, match):
    with pytest.raises(ProtocolError, match=match) as e:
        _parse(body)
    assert e.value.status == 400


def test_a_body_that_is_not_json():
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_feedback(b"{")
