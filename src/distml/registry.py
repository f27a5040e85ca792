"""A file-system model registry: versions per model name and movable aliases.

Layout::

    <root>/<name>/v1/{model.safetensors, spec.json}
    <root>/<name>/v2/...
    <root>/<name>/aliases.json          {"production": 2}
    <root>/<name>/audit.jsonl           one line per registration and alias move

A version folder is copied in under a temporary name and renamed, so it is complete or
absent; its digests are checked on the copy (or recorded, for an artifact without them).
References: ``name`` (the production alias, else the newest version), ``name:3``,
``name@alias``, or a path to an artifact folder. The root may be a storage URL
(``s3://bucket/registry``): see ``MirroredRegistry``. Model and alias names must be one safe path
component (``NAME_PATTERN``); anything else is refused before a file is touched, so no
reference reads or writes outside ``<root>`` unless it is an artifact folder's path.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distml import storage
from distml.artifact import DIGESTS, SPEC, WEIGHTS, read_spec, verify_integrity, write_spec
from distml.config.base import MAX_PATH_LENGTH, NAME_PATTERN, NAME_RULE
from distml.errors import ArtifactError
from distml.fsutil import append_jsonl, write_json_atomic, write_text_atomic

PRODUCTION = "production"
AUDIT = "audit.jsonl"
REGISTERED = "registered.json"  # a version's source run and weights' digest (idempotence)
_VERSION = re.compile(r"^v(\d+)$")
STALE_S = 24 * 3600  # a mirror's unpublished version folder this old is a dead upload
_NAME = re.compile(NAME_PATTERN)


def shown(value: str) -> str:
    """A user's value for an error message, cut short (a hostile name may be megabytes)."""
    return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"


def check_name(value: str, *, what: str = "model name") -> str:
    """``value`` if it is a safe registry name (one path component), else ArtifactError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ArtifactError(f"{what} {shown(str(value))} is not valid: use {NAME_RULE}")
    return value


def actor() -> str:
    """Who is moving things, for the audit log: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path


class Registry:
    def __new__(cls, root: str | Path | None = None) -> Registry:  # None: unpickling
        if cls is Registry and root is not None \
                and storage.remote_of(storage.local_path(root)) is not None:
            return super().__new__(MirroredRegistry)  # a storage URL (or its mirror)
        return super().__new__(cls)

    def __init__(self, root: str | Path) -> None:
        self.root = storage.local_path(root)

    # -- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if _NAME.fullmatch(p.name) and p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[ModelVersion]:
        folder = self.root / check_name(name)
        if not folder.is_dir():
            return []
        found = [
            ModelVersion(name, int(m.group(1)), p)
            for p in folder.iterdir()
            if (m := _VERSION.match(p.name)) and p.is_dir()
        ]
        return sorted(found, key=lambda v: v.version)

    def aliases(self, name: str) -> dict[str, int]:
        path = self.root / check_name(name) / "aliases.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, version: int) -> ModelVersion:
        for v in self.versions(name):
            if v.version == version:
                return v
        have = [v.version for v in self.versions(name)]
        raise ArtifactError(
            f"model {name!r} has no version {version}"
            + (f"; versions: {have}" if have else f"; registered models: {self.names()}")
        )

    def audit(self, name: str) -> list[dict[str, Any]]:
        """The audit log of ``name``, oldest first."""
        path = self.root / check_name(name) / AUDIT
        lines = path.read_text().splitlines() if path.is_file() else []
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is damaged (not one JSON object a line): {e}") from None

    def resolve(self, ref: str, *, allow_path: bool = True) -> ModelVersion:
        """A reference (see module docstring) -> the version it names. ``allow_path``: whether
        a path to an artifact folder is a reference (False where a client names the model)."""
        if "\0" in ref or len(ref) > MAX_PATH_LENGTH:
            raise ArtifactError(f"model reference {shown(ref)} is not valid: give name, "
                                f"name:version or name@alias (names: {NAME_RULE})"
                                + (", or an artifact folder" if allow_path else ""))
        if allow_path and _is_artifact(Path(ref)):
            return ModelVersion(_artifact_name(Path(ref)), 0, Path(ref))
        if allow_path and ("/" in ref or ref.startswith(".")):
            raise ArtifactError(f"{shown(ref)} is not an artifact folder (no {SPEC} there) "
                                "and not a registry reference (name, name:version or "
                                "name@alias)")
        name, sep, alias = ref.partition("@")
        if sep:
            check_name(alias, what="alias")
            aliases = self.aliases(name)
            if alias not in aliases:
                raise ArtifactError(
                    f"model {name!r} has no alias {alias!r}; aliases: {sorted(aliases) or 'none'}"
                )
            return self.get(name, aliases[alias])
        name, sep, version = ref.partition(":")
        if sep:
            if not re.fullmatch(r"[0-9]{1,9}", version):
                raise ArtifactError(f"{ref!r}: the version after ':' must be a number")
            return self.get(name, int(version))
        versions = self.versions(name)
        if not versions:
            raise ArtifactError(
                f"no model {ref!r} in the registry at {self.root} and no artifact folder there; "
                f"registered models: {self.names() or 'none'}"
            )
        production = self.aliases(name).get(PRODUCTION)
        return self.get(name, production) if production is not None else versions[-1]

    # -- writing -------------------------------------------------------------------------------

    def register(self, artifact_dir: Path, name: str, *, by: str | None = None,
                 source: str | None = None) -> ModelVersion:
        """Copy an artifact in as the next version of ``name``: its recorded digests are
        checked on the copy (an artifact without them gets them), and the registration goes
        to the audit log with the weights' digest and ``source``.

        With a ``source`` (the run that selected it), registering is idempotent: the same
        weights from the same source, registered before, give that version back, so a run
        resumed after a crash between registering and recording it registers nothing twice
        (the source is in the version's ``registered.json``, which appears with the version).
        """
        check_name(name)
        spec = read_spec(artifact_dir)  # refuse anything that is not an artifact
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(artifact_dir, tmp)
        try:
            if DIGESTS in spec:  # one pass over the copy: corrupt at the source or in copying
                digests = verify_integrity(tmp, spec, shown=Path(artifact_dir))
            else:
                digests = write_spec(tmp, spec)[DIGESTS]
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if source is not None:
            if done := self._registered(name, source, digests[WEIGHTS]):
                shutil.rmtree(tmp, ignore_errors=True)
                return done
            # in the folder, so the version and where it came from appear in one rename
            (tmp / REGISTERED).write_text(json.dumps({"source": source,
                                                     "sha256": digests[WEIGHTS]}))
        while True:  # os.rename onto a missing name is atomic; retry if a racer took it
            version = self._next_version(name)
            target = folder / f"v{version}"
            try:
                os.rename(tmp, target)
                break
            except OSError:
                if not target.exists():
                    raise
        self._log(name, {"event": "register", "version": version,
                         "sha256": digests[WEIGHTS], "by": by or actor(),
                         **({} if source is None else {"source": source})})
        return ModelVersion(name, version, target)

    def _next_version(self, name: str) -> int:
        """One past every version folder there, complete or not."""
        return max((int(m.group(1)) for p in (self.root / name).iterdir()
                    if (m := _VERSION.match(p.name))), default=0) + 1

    def _registered(self, name: str, source: str, sha256: str) -> ModelVersion | None:
        """The version these weights from ``source`` were registered as, if still there."""
        for v in reversed(self.versions(name)):
            try:
                got = json.loads((v.path / REGISTERED).read_text())
            except (OSError, ValueError):
                continue
            if got == {"source": source, "sha256": sha256}:
                return v
        return None

    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "",
                  by: str | None = None) -> None:
        """Point ``alias`` at ``version``, logging the move (old and new version, each one's
        selection metric, ``reason`` and who) to the audit log first: a crash between the
        two leaves a logged move that did not happen, never an unlogged one."""
        check_name(alias, what="alias")
        new = self.get(name, version)  # must exist
        aliases = self.aliases(name)
        old = aliases.get(alias)
        previous = next((v for v in self.versions(name) if v.version == old), None)
        self._log(name, {
            "event": "alias", "alias": alias, "from_version": old, "to_version": version,
            "metric": _metric(new.path),
            "previous_metric": _metric(previous.path) if previous is not None else None,
            "reason": reason, "by": by or actor()})
        aliases[alias] = version
        write_json_atomic(self.root / name / "aliases.json", aliases)

    def _log(self, name: str, entry: dict[str, Any]) -> None:
        append_jsonl(self.root / name / AUDIT,
                     {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry})


def _is_artifact(path: Path) -> bool:
    try:
        return (path / SPEC).is_file()
    except (OSError, ValueError):  # a name too long for the file system is no folder
        return False


def _artifact_name(path: Path) -> str:
    """The model name an artifact folder carries (it names served models and reports)."""
    name = read_spec(path).get("name")
    if name is None:  # any folder name will do for a folder the user named; not a hostile one
        return path.name if _NAME.fullmatch(path.name) else "model"
    return check_name(name, what=f"the model name in {path / SPEC}")


def _metric(path: Path) -> dict[str, Any] | None:
    """The selection metric a version was chosen by, and its value (test, else val)."""
    try:
        spec = read_spec(path)
    except ArtifactError:
        return None
    name, metrics = spec.get("select_metric"), spec.get("metrics") or {}
    for split in ("test", "val"):
        if name is not None and name in (metrics.get(split) or {}):
            return {"name": name, "split": split, "value": metrics[split][name]}
    return None


class MirroredRegistry(Registry):
    """A registry under a storage URL, read and written through its local mirror.

    Each version is a published folder (``<url>/<name>/v<N>/``, claimed first by a
    conditional write of its claim object, its marker written last: a writer that loses the
    claim uploads nothing and takes the next number). A version without its marker (an
    upload killed half way) is invisible. ``aliases.json`` and ``audit.jsonl`` are single
    objects, rewritten whole (readers see the old or the new one); two writers moving the
    same model's aliases at once may lose one audit line, so promote from one place. Every
    lookup (``names``, ``resolve``: a server's hot reload) first pulls what was published
    since.
    """

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        url = storage.remote_of(self.root)
        assert url is not None
        self.url = url

    def names(self) -> list[str]:
        self._pull()
        return super().names()

    def versions(self, name: str) -> list[ModelVersion]:
        """The published versions (a folder in the mirror without its marker is not one)."""
        return [v for v in super().versions(name) if (v.path / storage.MARKER).is_file()]

    def resolve(self, ref: str, *, allow_path: bool = True) -> ModelVersion:
        if not (allow_path and _is_artifact(Path(ref))):
            self._pull()
        return super().resolve(ref, allow_path=allow_path)

    def register(self, artifact_dir: Path, name: str, *, by: str | None = None,
                 source: str | None = None) -> ModelVersion:
        for _ in range(10):
            self._pull()
            known = {v.version for v in self.versions(check_name(name))}
            version = super().register(artifact_dir, name, by=by, source=source)
            if version.version in known:  # registered before (idempotent with a source)
                return version
            try:  # claimed first (a conditional write), uploaded after
                marker = storage.publish_dir(
                    version.path, f"{self.url}/{name}/v{version.version}", exclusive=True)
            except FileExistsError:  # another writer claimed this number: take the next
                shutil.rmtree(version.path, ignore_errors=True)
                continue
            write_json_atomic(version.path / storage.MARKER, marker)
            self._push(name, AUDIT)
            return version
        raise ArtifactError(f"could not claim a version of {name!r} at {self.url}: "
                            "10 concurrent registrations won; try again")

    def set_alias(self, name: str, alias: str, version: int, *, reason: str = "",
                  by: str | None = None) -> None:
        self._pull()
        super().set_alias(name, alias, version, reason=reason, by=by)
        self._push(name, AUDIT)  # logged before it moves, as on a folder
        self._push(name, "aliases.json")

    def _next_version(self, name: str) -> int:
        """One past every version folder in the mirror and in the store (claimed ones too)."""
        remote = (int(m.group(1)) for n in storage.children(f"{self.url}/{name}", "v*")
                  if (m := _VERSION.match(n)))
        return max(super()._next_version(name), max(remote, default=0) + 1)

    def _push(self, name: str, file: str) -> None:
        storage.put_text(f"{self.url}/{name}/{file}", (self.root / name / file).read_text())

    def _pull(self) -> None:
        """Fetch the versions published since, and every model's aliases and audit log."""
        for stale in self.root.glob("*/v*"):  # a registration that never published
            if (_VERSION.match(stale.name) and not (stale / storage.MARKER).is_file()
                    and time.time() - stale.stat().st_mtime > STALE_S):  # not one uploading
                shutil.rmtree(stale, ignore_errors=True)
        names = set()
        for url in storage.published(self.url, "*/v*"):
            name, folder = url.rsplit("/", 2)[-2:]
            if not (_NAME.fullmatch(name) and _VERSION.match(folder)):
                continue
            names.add(name)
            local = self.root / name / folder
            if not (local / storage.MARKER).is_file():  # published versions never change
                local.parent.mkdir(parents=True, exist_ok=True)
                storage.fetch_dir(url, local)
        for name in names:
            for file in ("aliases.json", AUDIT):
                text = storage.get_text(f"{self.url}/{name}/{file}")
                if text is not None:
                    write_text_atomic(self.root / name / file, text)
