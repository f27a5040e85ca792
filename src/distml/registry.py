"""A file-system model registry: versions per model name and movable aliases.

Layout::

    <root>/<name>/v1/{model.safetensors, spec.json}
    <root>/<name>/v2/...
    <root>/<name>/aliases.json          {"production": 2}

A version folder is copied in under a temporary name and renamed, so it is complete or
absent. References: ``name`` (the production alias, else the newest version), ``name:3``,
``name@alias``, or a path to an artifact folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from distml.artifact import read_spec
from distml.errors import ArtifactError
from distml.fsutil import write_json_atomic

PRODUCTION = "production"
_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[ModelVersion]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [
            ModelVersion(name, int(m.group(1)), p)
            for p in folder.iterdir()
            if (m := _VERSION.match(p.name)) and p.is_dir()
        ]
        return sorted(found, key=lambda v: v.version)

    def aliases(self, name: str) -> dict[str, int]:
        path = self.root / name / "aliases.json"
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

    def resolve(self, ref: str) -> ModelVersion:
        """A reference (see module docstring) -> the version it names."""
        path = Path(ref)
        if (path / "spec.json").is_file():
            return ModelVersion(read_spec(path).get("name", path.name), 0, path)
        name, sep, alias = ref.partition("@")
        if sep:
            aliases = self.aliases(name)
            if alias not in aliases:
                raise ArtifactError(
                    f"model {name!r} has no alias {alias!r}; aliases: {sorted(aliases) or 'none'}"
                )
            return self.get(name, aliases[alias])
        name, sep, version = ref.partition(":")
        if sep:
            if not version.isdigit():
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

    def register(self, artifact_dir: Path, name: str) -> ModelVersion:
        """Copy an artifact in as the next version of ``name``."""
        if not _NAME.match(name):
            raise ArtifactError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
        read_spec(artifact_dir)  # refuse anything that is not an artifact
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(artifact_dir, tmp)
        while True:  # os.rename onto a missing name is atomic; retry if a racer took it
            version = max((v.version for v in self.versions(name)), default=0) + 1
            target = folder / f"v{version}"
            try:
                os.rename(tmp, target)
                return ModelVersion(name, version, target)
            except OSError:
                if not target.exists():
                    raise

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.get(name, version)  # must exist
        aliases = self.aliases(name)
        aliases[alias] = version
        write_json_atomic(self.root / name / "aliases.json", aliases)
