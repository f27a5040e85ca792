from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from distml.artifact import load_artifact, read_spec, save_artifact, write_spec
from distml.errors import ArtifactError
from distml.models import build_model
from distml.registry import PRODUCTION, Registry
from tests.helpers.artifacts import SPEC, small_artifact


def test_round_trip_gives_same_predictions_with_preprocessing(tmp_path):
    model, path = small_artifact(tmp_path)
    loaded = load_artifact(path)
    raw = np.array([[1.0, 2.0, 3.0], [5.0, -2.0, 0.0]], dtype=np.float32)
    expected = model.eval()(torch.from_numpy((raw - [1, 2, 3]) / 2).float()).softmax(-1)
    np.testing.assert_allclose(loaded.predict(raw), expected.detach().numpy(), rtol=1e-6)
    assert loaded.labels == ["no", "yes"]
    assert read_spec(path)["format_version"] == 1


def test_tied_transformer_weights_round_trip(tmp_path):
    spec = {"type": "transformer", "kwargs": {"context_length": 8, "num_layers": 1,
                                              "num_heads": 2, "dim": 16}}
    model = build_model(spec).eval()
    path = save_artifact(model, {**SPEC, "task": "language_modeling", "model": spec},
                         tmp_path / "lm")
    loaded = load_artifact(path)
    tokens = np.arange(8)[None]
    np.testing.assert_allclose(loaded.predict(tokens), model(torch.from_numpy(tokens)).detach())
    assert loaded.model.head.weight.data_ptr() == loaded.model.tok_emb.weight.data_ptr()


def test_a_pickle_in_place_of_weights_is_refused(tmp_path):
    _, path = small_artifact(tmp_path)
    (path / "model.safetensors").write_bytes(pickle.dumps({"evil": object}))
    write_spec(path, read_spec(path))  # digests that match: the format check still refuses
    with pytest.raises(ArtifactError, match=r"model\.safetensors is not valid safetensors"):
        load_artifact(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"is not a model artifact \(no spec\.json\)"):
        load_artifact(tmp_path)


def test_registry_versions_aliases_and_references(tmp_path):
    reg = Registry(tmp_path / "reg")
    _, a = small_artifact(tmp_path, "a", seed=0)
    _, b = small_artifact(tmp_path, "b", seed=1)
    v1, v2 = reg.register(a, "digits"), reg.register(b, "digits")
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("digits").version == 2  # no alias: newest
    reg.set_alias("digits", PRODUCTION, 1)
    assert reg.resolve("digits").version == 1  # production wins
    assert reg.resolve("digits@production").version == 1
    assert reg.resolve("digits:2").path == tmp_path / "reg" / "digits" / "v2"
    assert reg.resolve(str(a)).path == a  # a plain artifact folder
    assert reg.names() == ["digits"]


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("nope", r"no model 'nope' in the registry .*registered models: \['digits'\]"),
        ("digits:9", r"model 'digits' has no version 9; versions: \[1\]"),
        ("digits:x", r"the version after ':' must be a number"),
        ("digits@staging", r"model 'digits' has no alias 'staging'; aliases: none"),
    ],
)
def test_registry_reference_errors(tmp_path, ref, match):
    reg = Registry(tmp_path / "reg")
    reg.register(small_artifact(tmp_path)[1], "digits")
    with pytest.raises(ArtifactError, match=match):
        reg.resolve(ref)


def test_alias_to_missing_version_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.register(small_artifact(tmp_path)[1], "digits")
    with pytest.raises(ArtifactError, match=r"has no version 5"):
        reg.set_alias("digits", PRODUCTION, 5)
