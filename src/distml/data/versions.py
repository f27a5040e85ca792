"""Content-addressed dataset versions and their lineage.

A data set's version is the SHA-256 of what ingestion read and how it prepared it: every input
file's bytes (its SHA-256) or remote object's ETag and size, the data config (source, splits,
transforms; not the loader, which only reads) and the seed. A file overwritten with the same
size and modification time has new bytes, so a new version: the ingested-data cache is keyed by
the version, never by file times. Hashes of local files are memoised per process by
(inode, size, mtime, ctime): ctime cannot be set back, so an overwrite always re-hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from distml import storage
from distml.config import DataConfig
from distml.data.dataset import MANIFEST, SPLITS
from distml.errors import DataError
from distml.fsutil import file_sha256

VERSION_LENGTH = 16  # hex digits of the version: the cache folder is data-<version>


@lru_cache(maxsize=4096)
def _sha256(path: str, stamp: tuple[int, int, int, int]) -> str:
    return file_sha256(Path(path))


def file_checksum(path: Path) -> dict[str, Any]:
    """A local input's lineage entry: its path, size and SHA-256."""
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return {"path": str(path), "bytes": st.st_size, "sha256": _sha256(str(path), stamp)}


def checksums(files: list[Path]) -> list[dict[str, Any]]:
    """``file_checksum`` of each file, hashed on threads (hashlib releases the GIL)."""
    if len(files) < 2:
        return [file_checksum(f) for f in files]
    with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(file_checksum, files))


def data_version(data: DataConfig, seed: int, fingerprint: dict[str, Any]) -> str:
    """The version of the data set ``data`` makes of inputs ``fingerprint`` (a Source's)."""
    config = data.model_dump(mode="json", exclude={"loader"})
    if not data.split.unlabelled:  # so versions from before the key stay the same
        del config["split"]["unlabelled"]
    blob = json.dumps([config, seed, fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:VERSION_LENGTH]


def lineage(manifest: Any) -> dict[str, Any]:
    """What a model's spec and a run's summary record of the data it learned from."""
    return {"version": manifest.version, "inputs": manifest.source.get("files", []),
            "source": manifest.source.get("source"),
            "rows": {s: manifest.rows(s) for s in SPLITS}}


def list_versions(output_dir: Path | str) -> list[dict[str, Any]]:
    """Every ingested data set under ``output_dir`` (a folder or a URL): its manifest, with
    ``project`` and ``where`` added, oldest version folder name first."""
    url = storage.as_url(str(output_dir)) or storage.remote_of(output_dir)
    found = []
    if url is not None:
        for folder in storage.published(url, "*/data-*"):
            text = storage.get_text(f"{folder}/{MANIFEST}")
            if text is not None:
                found.append((folder, json.loads(text)))
    else:
        for path in sorted(Path(output_dir).glob(f"*/data-*/{MANIFEST}")):
            found.append((str(path.parent), json.loads(path.read_text())))
    return [{**m, "where": where, "project": where.rstrip("/").rsplit("/", 2)[-2]}
            for where, m in found]


def find_version(output_dir: Path | str, prefix: str) -> dict[str, Any]:
    """The data set whose version starts with ``prefix`` (at least 4 digits), or an error."""
    hits = [m for m in list_versions(output_dir)
            if len(prefix) >= 4 and m.get("version", "").startswith(prefix)]
    if len(hits) != 1:
        have = sorted({m.get("version", "?") for m in list_versions(output_dir)})
        what = "no data version" if not hits else f"{len(hits)} data versions"
        raise DataError(f"{what} under {output_dir} starts with {prefix!r}; give 4 or more "
                        f"digits of one of: {', '.join(have) or 'none (ingest first)'}")
    return hits[0]


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Which inputs were added, removed or changed, and the rows per split, of two
    manifests."""
    def inputs(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {f["path"]: f for f in m.get("source", {}).get("files", [])}

    a, b = inputs(old), inputs(new)
    return {
        "added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
        "changed": sorted(p for p in set(a) & set(b) if a[p] != b[p]),
        "rows": {s: (old["splits"][s]["rows"], new["splits"][s]["rows"]) for s in SPLITS},
        "config_changed": old.get("preprocessing") != new.get("preprocessing"),
    }
