"""Safe by default: code named by an artifact runs only when trusted, digests catch corrupt
or edited artifacts, alias moves are audited, and hostile names never reach outside the
registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from distml.artifact import (
    WEIGHTS,
    code_references,
    file_sha256,
    load_artifact,
    read_spec,
    write_spec,
)
from distml.config import ServeConfig
from distml.errors import ArtifactError, ConfigError
from distml.registry import AUDIT, PRODUCTION, Registry
from distml.serving.model import load_served_model
from distml.trust import TrustPolicy
from tests.helpers.artifacts import SPEC, small_artifact
from tests.helpers.configs import make_config

MARKER_MODULE = '''
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")  # any import runs this

def scale(cols):
    return {n: v * 1.0 for n, v in cols.items()}
'''


def _with_marker_transform(tmp_path: Path) -> tuple[Path, Path, str]:
    """An artifact whose preprocessing names a function in a module that, once imported,
    writes MARKER beside itself; returns (artifact, marker, 'module:function')."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "marker_mod.py").write_text(MARKER_MODULE)
    fn = f"{code / 'marker_mod.py'}:scale"
    art = small_artifact(tmp_path, preprocessing=[*SPEC["preprocessing"], {"type": fn}])[1]
    return art, code / "MARKER", fn


# -- trust --------------------------------------------------------------------------------------

def test_an_artifact_naming_code_is_refused_untrusted_and_runs_trusted(tmp_path):
    art, marker, fn = _with_marker_transform(tmp_path)
    with pytest.raises(ArtifactError, match=rf"names code .*transform '{fn}'.*--trust-code"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match=r"--trust-module .*marker_mod\.py"):
        load_served_model(str(art), registry=tmp_path / "reg")  # what distml serve loads with
    assert not marker.exists()  # refused before the module was imported
    served = load_served_model(str(art), registry=tmp_path / "reg",
                               trust=TrustPolicy.for_serve(ServeConfig(trust_code=True)))
    assert served.infer(np.ones((2, 3)))["label"].shape == (2,)
    assert marker.read_text() == "imported"


def test_trusted_modules_trust_those_modules_only(tmp_path):
    art, marker, fn = _with_marker_transform(tmp_path)
    module = fn.rpartition(":")[0]
    with pytest.raises(ArtifactError, match="names code"):
        load_artifact(art, trust=TrustPolicy.of(modules=["marker", str(tmp_path / "other.py")]))
    assert not marker.exists()
    settings = make_config({"name": "x", "data": {"source": "sklearn:digits"},
                            "train": {"candidates": [{"name": "m", "model": {"type": "mlp"}}]},
                            "serve": {"trusted_modules": ["code/marker_mod.py"]}},
                           base_dir=tmp_path).serve
    assert settings.trusted_modules == [module]  # relative to the config's folder
    load_artifact(art, trust=TrustPolicy.for_serve(settings)).predict(np.ones((1, 3)))
    assert marker.exists()


def test_module_trust_covers_submodules_not_lookalikes():
    policy = TrustPolicy.of(modules=["mypkg"])
    assert policy.allows("mypkg:f")
    assert policy.allows("mypkg.sub.mod:f")
    assert not policy.allows("mypkg_evil:f")
    assert not policy.allows("os:system")
    assert TrustPolicy(trust_code=True).allows("os:system")


def test_a_user_model_factory_is_code_and_zoo_models_are_not(tmp_path):
    assert code_references(SPEC) == []  # mlp + standardize: built in
    zoo_path = {**SPEC, "model": {**SPEC["model"], "type": "distml.models.mlp:MLP"}}
    evil = {**SPEC, "model": {"type": "subprocess:run", "kwargs": {"args": ["touch", "x"]}}}
    other_distml = {**SPEC, "model": {"type": "distml.fsutil:write_text_atomic", "kwargs": {}}}
    assert code_references(zoo_path) == []
    assert code_references(evil) == [("model factory", "subprocess:run")]
    assert code_references(other_distml) == [("model factory", "distml.fsutil:write_text_atomic")]
    art = small_artifact(tmp_path)[1]
    write_spec(art, {**read_spec(art), "model": evil["model"]})
    with pytest.raises(ArtifactError, match=r"model factory 'subprocess:run'"):
        load_artifact(art)
    assert not (Path.cwd() / "x").exists()


# -- integrity ----------------------------------------------------------------------------------

def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(tmp_path):
    art = small_artifact(tmp_path)[1]
    weights = art / WEIGHTS
    assert read_spec(art)["sha256"][WEIGHTS] == file_sha256(weights)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's values: still valid safetensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{weights}.* does not match the SHA-256"):
        load_artifact(art)


@pytest.mark.parametrize("edit", ["metrics", "drop_digests", "labels_order"])
def test_an_edited_spec_is_refused(tmp_path, edit):
    art = small_artifact(tmp_path)[1]
    spec = json.loads((art / "spec.json").read_text())
    if edit == "metrics":
        spec["metrics"]["val"]["accuracy"] = 0.99
    elif edit == "drop_digests":
        del spec["sha256"]
    else:
        spec["labels"] = spec["labels"][::-1]  # the same model, answers swapped
    (art / "spec.json").write_text(json.dumps(spec))
    match = "records no SHA-256" if edit == "drop_digests" else "spec.json does not match"
    with pytest.raises(ArtifactError, match=match):
        load_artifact(art)


def test_the_spec_digest_ignores_layout(tmp_path):
    art = small_artifact(tmp_path)[1]
    spec = json.loads((art / "spec.json").read_text())
    (art / "spec.json").write_text(json.dumps(dict(reversed(spec.items())), indent=None))
    load_artifact(art)


def test_register_checks_digests_and_records_them_when_missing(tmp_path):
    reg = Registry(tmp_path / "reg")
    art = small_artifact(tmp_path)[1]
    (art / WEIGHTS).write_bytes((art / WEIGHTS).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match=rf"{art / WEIGHTS} does not match"):
        reg.register(art, "m")
    assert reg.versions("m") == []
    assert os.listdir(tmp_path / "reg" / "m") == []
    old = small_artifact(tmp_path, "old")[1]  # as an older distml wrote it: no digests
    spec = read_spec(old)
    del spec["sha256"]
    (old / "spec.json").write_text(json.dumps(spec))
    version = reg.register(old, "m")
    load_artifact(version.path)  # digests recorded at registration
    (entry,) = reg.audit("m")
    assert entry["event"] == "register"
    assert entry["version"] == 1
    assert entry["sha256"] == file_sha256(version.path / WEIGHTS)


# -- audit log ----------------------------------------------------------------------------------

def test_alias_moves_are_appended_to_the_audit_log(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i, acc in enumerate((0.5, 0.7)):
        _, art = small_artifact(tmp_path, f"a{i}", select_metric="accuracy", metrics={
            "val": {"accuracy": acc}, "test": {"accuracy": acc + 0.01}})
        reg.register(art, "m")
    reg.set_alias("m", PRODUCTION, 1, reason="first", by="tester")
    reg.set_alias("m", PRODUCTION, 2, reason="better")
    moves = [e for e in reg.audit("m") if e["event"] == "alias"]
    assert [(e["from_version"], e["to_version"]) for e in moves] == [(None, 1), (1, 2)]
    assert moves[1]["metric"] == {"name": "accuracy", "split": "test", "value": 0.71}
    assert moves[1]["previous_metric"]["value"] == 0.51
    assert moves[0]["by"] == "tester"
    assert "@" in moves[1]["by"]
    assert moves[1]["reason"] == "better"
    assert moves[1]["time"].endswith("+00:00")
    lines = (tmp_path / "reg" / "m" / AUDIT).read_text().splitlines()
    assert len(lines) == 4
    assert all(json.loads(line) for line in lines)


# -- hostile names ------------------------------------------------------------------------------

HOSTILE = ["../outside", "..", "/abs/outside", "a\0b", "x" * 5000, "a/b", "m\n", ".hidden",
           "m@../outside", "m@", "../outside:1", "m:1e3", "m:²", "m:" + "9" * 30]


@pytest.fixture
def guarded(tmp_path):
    """A registry holding model 'm' v1, and beside it a folder 'outside' laid out exactly like
    a registered model (so a name escaping the registry would find a model there)."""
    reg = Registry(tmp_path / "reg")
    reg.register(small_artifact(tmp_path)[1], "m")
    outside = tmp_path / "outside"
    (outside / "v1").mkdir(parents=True)
    for f in ("spec.json", WEIGHTS):
        (outside / "v1" / f).write_bytes((tmp_path / "reg" / "m" / "v1" / f).read_bytes())
    (outside / "aliases.json").write_text('{"production": 1}')
    return reg, outside


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ref", HOSTILE, ids=lambda r: repr(r[:20]))
def test_hostile_refs_are_refused_without_touching_anything_outside(guarded, ref, monkeypatch):
    reg, outside = guarded
    monkeypatch.chdir(reg.root)  # '../outside' from here is the lookalike model too
    before = _snapshot(outside.parent)
    with pytest.raises(ArtifactError, match=r"not valid|not an artifact folder|must be a num"):
        reg.resolve(ref)
    for call in (lambda: reg.register(outside / "v1", ref),  # every one is a bad name too
                 lambda: reg.set_alias(ref, PRODUCTION, 1),
                 lambda: reg.set_alias("m", ref, 1),
                 lambda: reg.resolve(ref, allow_path=False)):
        with pytest.raises(ArtifactError, match=r"not valid|must be a num"):
            call()
    assert _snapshot(outside.parent) == before  # nothing written anywhere


def test_long_names_get_a_short_message(guarded):
    reg, _ = guarded
    with pytest.raises(ArtifactError) as info:
        reg.resolve("x" * 100_000)
    assert len(str(info.value)) < 300
    assert "100000 characters" in str(info.value)


def test_a_path_ref_to_an_artifact_is_still_a_reference(guarded):
    reg, outside = guarded
    assert reg.resolve(str(outside / "v1")).path == outside / "v1"  # the user named it
    with pytest.raises(ArtifactError, match="not valid"):
        reg.resolve(str(outside / "v1"), allow_path=False)  # where a client names the model


@pytest.mark.parametrize(("override", "match"), [
    ("name=../up", r"name = '\.\./up': not a valid name"),
    ("name=" + "n" * 101, r"name = 'nnnn.*: not a valid name: use 1-100"),
    ("train.candidates.0.name=a/b", r"train\.candidates\[0\]\.name = 'a/b': not a valid name"),
    ("select.register_as=.hidden", r"select\.register_as = '\.hidden': not a valid name"),
    ("output_dir=\"runs\\0x\"", r"output_dir = 'runs\\x00x': .*contains a NUL byte"),
    ("registry=" + "r/" * 3000, r"registry = .*\(6002 characters\).*too long"),
    ("data.source=" + "d" * 300 + ".csv", r"data\.source\.path = .*255 bytes per"),
    ("serve.trusted_modules=[\"os system\"]", r"neither a module name"),
])
def test_hostile_names_and_paths_in_a_config_are_refused(tiny_raw, override, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_raw, overrides=[override])


def test_an_artifact_folder_giving_itself_a_hostile_name_is_refused(tmp_path):
    art = small_artifact(tmp_path)[1]
    write_spec(art, {**read_spec(art), "name": "../../etc"})  # served as, reported as
    with pytest.raises(ArtifactError, match=r"model name in .*spec\.json '\.\./\.\./etc' is not"):
        Registry(tmp_path / "reg").resolve(str(art))


def test_tls_files_in_a_config_are_relative_to_it_and_checked_as_a_pair(tiny_raw, tmp_path):
    from distml.config import load_config
    from distml.serving.transport import load_tls
    from tests.helpers.configs import write_config
    from tests.helpers.tls import make_certificates

    (tmp_path / "conf" / "tls").mkdir(parents=True)
    files = make_certificates(tmp_path / "conf" / "tls")
    tiny_raw["serve"] = {"ssl_certfile": "tls/server.pem", "ssl_keyfile": "tls/server-key.pem"}
    cfg = load_config(write_config(tmp_path / "conf" / "c.yaml", tiny_raw))
    assert cfg.serve.ssl_certfile == files.cert
    tls = load_tls(cfg.serve)
    assert tls.cert == files.cert.read_bytes()
    assert tls.key == files.key.read_bytes()
    assert load_tls(ServeConfig()) is None
    with pytest.raises(ConfigError, match=r"--ssl-certfile \(serve.ssl_certfile\) .*ca.pem.* "
                                          "and --ssl-keyfile .* not a PEM certificate"):
        load_tls(ServeConfig(ssl_certfile=files.ca, ssl_keyfile=files.key))  # not its key
    with pytest.raises(ConfigError, match=r"--ssl-keyfile \(serve.ssl_keyfile\) '.*tls': "
                                          "cannot read it"):
        load_tls(ServeConfig(ssl_certfile=files.cert, ssl_keyfile=files.key.parent))
