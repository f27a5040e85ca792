"""Safe by default, as a user meets it on the command line: an artifact naming code is refused
by ``distml predict`` (whose workers load the model again) unless ``--trust-code`` is given,
``distml models show`` prints the checked digest, promotions are in the audit log, and
hostile references are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distml.artifact import WEIGHTS, file_sha256, read_spec, write_spec
from distml.cli import app
from distml.drift.columns import Gate
from distml.errors import ArtifactError
from distml.registry import Registry
from distml.workflow.drift_report import run_monitor
from tests.helpers.cli import distml

MARKER_MODULE = '''
import os
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")  # any import runs this

def same(cols):
    Path(__file__).with_name(f"CALLED-{os.getpid()}").touch()
    return dict(cols)
'''


@pytest.fixture
def code_artifact(trained_digits: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """The trained digits model with a user transform appended to its preprocessing, its
    digests recorded again (as a careful attacker would): (artifact, marker, function)."""
    (tmp_path / "marker_mod.py").write_text(MARKER_MODULE)
    fn = f"{tmp_path / 'marker_mod.py'}:same"
    art = tmp_path / "artifact"
    shutil.copytree(trained_digits / "registry" / "tiny" / "v1", art)
    spec = read_spec(art)
    spec["preprocessing"].append({"type": fn})
    write_spec(art, spec)
    return art, tmp_path / "MARKER", fn


def test_predict_refuses_code_untrusted_and_runs_it_with_trust_code(code_artifact,
                                                                    trained_digits, tmp_path):
    art, marker, fn = code_artifact
    args = ("predict", str(art), "--input", str(trained_digits / "digits.parquet"),
            "--output", str(tmp_path / "out.parquet"), "--workers", "2", "-q")
    refused = distml(*args, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert _flat(f"transform '{fn}'") in _flat(refused.stderr)
    assert "--trust-code" in refused.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.parquet").exists()
    distml(*args, "--trust-code", cwd=tmp_path)
    assert pq.read_metadata(tmp_path / "out.parquet").num_rows == 1797
    assert marker.read_text() == "imported"
    assert list(tmp_path.glob("CALLED-*"))  # the workers ran it: the trust went with the job


def test_serve_refuses_code_untrusted(code_artifact, tmp_path):
    art, marker, fn = code_artifact
    proc = subprocess.run([sys.executable, "-m", "distml", "serve", str(art), "--port", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert _flat(f"transform '{fn}'") in _flat(proc.stderr)
    assert not marker.exists()


def test_monitor_refuses_code_untrusted(code_artifact, trained_digits, tmp_path):
    art, marker, fn = code_artifact
    with pytest.raises(ArtifactError, match=f"transform '{fn}'"):
        run_monitor(str(art), trained_digits / "digits.parquet", tmp_path / "report",
                    registry=trained_digits / "registry", labels=None, json_out=None,
                    gate=Gate(), detector="adwin")
    assert not marker.exists()


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _flat(text: str) -> str:
    """Without whitespace: rich wraps long lines (paths) to the terminal's width."""
    return "".join(text.split())


def test_models_show_prints_the_checked_digest(trained_digits):
    out = _cli("models", "show", "tiny", "--registry", str(trained_digits / "registry"))
    assert out.exit_code == 0, out.output
    digest = file_sha256(trained_digits / "registry" / "tiny" / "v1" / WEIGHTS)
    assert _flat(f"sha256 model.safetensors: {digest} (verified)") in _flat(out.output)
    assert "code it names: none" in out.output


@pytest.fixture
def registry_copy(trained_digits, tmp_path) -> Path:
    return Path(shutil.copytree(trained_digits / "registry", tmp_path / "registry"))


def test_a_replaced_model_is_refused_by_show_even_with_new_digests(registry_copy):
    v1 = registry_copy / "tiny" / "v1"
    data = bytearray((v1 / WEIGHTS).read_bytes())
    data[-3] ^= 0x10
    (v1 / WEIGHTS).write_bytes(bytes(data))
    out = _cli("models", "show", "tiny", "--registry", str(registry_copy))
    assert out.exit_code == 2
    assert _flat(f"{v1 / WEIGHTS} does not match the SHA-256") in _flat(out.output)
    write_spec(v1, read_spec(v1))  # digests recomputed: only the audit log still knows
    out = _cli("models", "show", "tiny", "--registry", str(registry_copy))
    assert out.exit_code == 2
    assert _flat("replaced after registration") in _flat(out.output)


def test_promotions_are_in_the_audit_log(trained_digits, registry_copy):
    moves = [e for e in Registry(trained_digits / "registry").audit("tiny")
             if e["event"] == "alias"]
    (auto,) = moves  # distml run promoted v1: the first production version
    assert (auto["alias"], auto["from_version"], auto["to_version"]) == ("production", None, 1)
    assert auto["metric"]["name"] == "accuracy"
    assert auto["metric"]["split"] == "test"
    assert "no production version before" in auto["reason"]
    out = _cli("models", "promote", "tiny", "1", "--alias", "staging",
               "--registry", str(registry_copy))
    assert out.exit_code == 0, out.output
    last = json.loads((registry_copy / "tiny" / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["alias"], last["to_version"], last["reason"]) == (
        "staging", 1, "distml models promote")


@pytest.mark.parametrize("ref", ["../registry/tiny", "tiny@../../x", "t" * 5000, "tiny\0"])
def test_hostile_refs_on_the_command_line_exit_2(registry_copy, ref, tmp_path):
    out = _cli("models", "show", ref, "--registry", str(registry_copy))
    assert out.exit_code == 2
    assert "error:" in out.output
    assert len(out.output) < 600
    out = _cli("models", "promote", ref, "1", "--registry", str(registry_copy))
    assert out.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host"])
def test_serve_refuses_a_network_address_without_a_token(trained_digits, tmp_path, host):
    out = distml("serve", "tiny", "--registry", str(trained_digits / "registry"), "--host",
                 host, cwd=tmp_path, check=False, env={"DISTML_SERVE_TOKEN": ""})
    assert out.returncode == 2
    assert "reachable from other machines" in out.stderr
    assert "--insecure" in out.stderr
    assert "serving" not in out.stdout  # refused before anything listened


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from tests.helpers.tls import make_certificates

    return make_certificates(tmp_path_factory.mktemp("tls"))


def _serve(trained_digits: Path, *args: str):
    return CliRunner().invoke(app, ["serve", "tiny", "--registry",
                                    str(trained_digits / "registry"), "--port", "0", *args],
                              env={"DISTML_SERVE_TOKEN": ""})


def test_serve_refuses_half_or_unreadable_tls_files_naming_the_flag(trained_digits, tls_files,
                                                                   tmp_path):
    cert, key = str(tls_files.cert), str(tls_files.key)
    out = _serve(trained_digits, "--ssl-certfile", cert)
    assert out.exit_code == 2
    assert _flat(f"--ssl-certfile (serve.ssl_certfile) is '{cert}' but --ssl-keyfile") in \
        _flat(out.output)
    out = _serve(trained_digits, "--ssl-keyfile", key)
    assert out.exit_code == 2
    assert _flat(f"--ssl-keyfile (serve.ssl_keyfile) is '{key}' but --ssl-certfile") in \
        _flat(out.output)
    missing = str(tmp_path / "nope.pem")
    out = _serve(trained_digits, "--ssl-certfile", cert, "--ssl-keyfile", missing)
    assert out.exit_code == 2
    assert _flat(f"--ssl-keyfile (serve.ssl_keyfile) '{missing}': cannot read it") in \
        _flat(out.output)
    other = make_other_key(tmp_path)  # a key that is not the certificate's
    out = _serve(trained_digits, "--ssl-certfile", cert, "--ssl-keyfile", str(other))
    assert out.exit_code == 2
    assert "matching" in out.output
    assert "serving" not in out.output


def make_other_key(folder: Path) -> Path:
    from tests.helpers.tls import make_certificates

    (folder / "other").mkdir()
    return make_certificates(folder / "other").key


def test_tls_does_not_replace_the_token_on_a_network_address(trained_digits, tls_files):
    out = _serve(trained_digits, "--host", "0.0.0.0", "--ssl-certfile", str(tls_files.cert),
                 "--ssl-keyfile", str(tls_files.key))
    assert out.exit_code == 2
    assert "reachable from other machines" in out.output
    assert _flat("TLS encrypts the traffic but does not authenticate clients") in \
        _flat(out.output)
    assert "--insecure" in out.output
