"""Storage URLs (``s3://bucket/prefix``, or any other file system fsspec speaks).

Remote data is read in place through fsspec (listing, retries and multipart uploads come from
the library). Remote *outputs* (``output_dir``, ``registry``) are worked on in a local mirror,
``$DISTML_CACHE/mirror/<scheme>/<bucket>/<prefix>`` (default ``~/.cache/distml``), and
published from it: a config or a command naming ``s3://b/runs`` gets the mirror's path, and
``remote_of`` gives the URL back, so the code below the boundary sees folders.

Atomic publish on a store without rename: a folder is published by uploading its files, then
one small marker object, ``_distml_published.json``, listing every file with its size and
SHA-256. Readers (``fetch_dir``, the registry) ignore a prefix without its marker and check
what they download against it, so a writer killed mid-upload leaves nothing that loads as
complete. The registry claims a version by writing its marker with S3's conditional write
(``If-None-Match``): two registrants never publish the same version.

Credentials and endpoint come from the standard AWS variables and profiles
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``);
nothing here writes them anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distml.errors import DistmlError
from distml.fsutil import file_sha256

MARKER = "_distml_published.json"
CLAIM = "_distml_claimed"  # a folder's first object under exclusive publishing (its owner's)
_URL = re.compile(r"^([a-z][a-z0-9+.-]+):/+(.*)$")
# Schemes fsspec serves that are not the local disk (a collapsed 's3:/b/k' from a Path too).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "hdfs", "http",
                  "https")
_CREDENTIALS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and "
                "AWS_ENDPOINT_URL for an S3-compatible store")


class StorageError(DistmlError):
    """A storage URL that cannot be read or written: one line naming it and the fix."""


def as_url(value: str | Path) -> str | None:
    """The URL ``value`` names (``s3://b/k``; also the ``s3:/b/k`` a Path makes of it), or
    None for a local path."""
    m = _URL.match(str(value))
    if m is None or m.group(1) not in REMOTE_SCHEMES:
        return None
    return f"{m.group(1)}://{m.group(2).rstrip('/')}"


def cache_root() -> Path:
    return Path(os.environ.get("DISTML_CACHE") or Path.home() / ".cache" / "distml")


def _mirror_root() -> Path:
    return cache_root() / "mirror"


def local_path(value: str | Path) -> Path:
    """The folder code works on: ``value`` itself, or a URL's local mirror."""
    url = as_url(value)
    if url is None:
        return Path(value)
    scheme, rest = url.split("://", 1)
    if any(part in ("..", ".") for part in rest.split("/")):
        raise StorageError(f"{url}: '.' and '..' are not allowed in a storage URL's path")
    return _mirror_root() / scheme / rest


def remote_of(path: str | Path) -> str | None:
    """The URL a mirror folder (or a file or folder in it) stands for; None if local."""
    try:
        rel = Path(path).resolve().relative_to(_mirror_root().resolve())
    except ValueError:
        return None
    scheme, _, rest = rel.as_posix().partition("/")
    return f"{scheme}://{rest}".rstrip("/")


def shown_url(value: str | Path) -> str:
    """What to call a location in messages: its URL if it is a mirror, else the path."""
    return remote_of(value) or str(value)


def filesystem(url: str) -> Any:
    """An fsspec file system for ``url``'s scheme, with listings never cached (a poller must
    see new objects); built once per process and endpoint."""
    import fsspec  # optional dependency (distml[s3]): imported only for a URL

    scheme = url.split("://", 1)[0]
    options: dict[str, Any] = {"use_listings_cache": False} if scheme.startswith("s3") else {}
    try:
        return fsspec.filesystem(scheme, **options)
    except ImportError as e:
        raise StorageError(f"{url}: reading {scheme}:// needs {e.name or 'its fsspec driver'}; "
                           "pip install 'distml[s3]'") from None


def check_reachable(fs: Any, url: str) -> None:
    """Raise the store's error if ``url``'s bucket is missing or the credentials are refused
    (a listing that finds nothing would not); run inside ``translated``."""
    if url.startswith("s3"):
        fs.ls(_key(url).split("/", 1)[0], detail=False)


def _key(url: str) -> str:
    return url.split("://", 1)[1]


@contextmanager
def translated(url: str, *, action: str = "access") -> Iterator[None]:
    """Errors of the store -> one StorageError line naming ``url`` and what to set."""
    try:
        yield
    except (StorageError, FileExistsError):  # FileExistsError: a lost conditional write
        raise
    except FileNotFoundError as e:
        if "bucket" in str(e).lower():
            bucket = _key(url).split("/", 1)[0]
            raise StorageError(
                f"cannot {action} {url}: bucket {bucket!r} does not exist at "
                f"{_endpoint()}; create it or fix the URL (and AWS_ENDPOINT_URL)") from None
        raise StorageError(f"cannot {action} {url}: it does not exist") from None
    except PermissionError as e:
        raise StorageError(f"cannot {action} {url}: access denied or credentials rejected "
                           f"by {_endpoint()} ({_first_line(e)}); {_CREDENTIALS}") from None
    except OSError as e:
        raise StorageError(f"cannot {action} {url}: {_first_line(e)}; {_CREDENTIALS}") from None
    except Exception as e:
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise StorageError(f"cannot {action} {url}: no credentials found; "
                               f"{_CREDENTIALS}") from None
        raise


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# -- publishing folders -------------------------------------------------------------------


def _files(local: Path) -> list[Path]:
    """The plain files of a folder (links and marker-named files are not published)."""
    return sorted(p for p in local.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.name != MARKER
                  and not any(part.startswith(".") for part in p.relative_to(local).parts))


def publish_dir(local: Path, url: str, *, exclusive: bool = False,
                on_uploaded: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Upload ``local``'s files under ``url``, then its marker. With ``exclusive``, the folder
    is first claimed by a conditional write of its claim object (FileExistsError, with
    nothing written, if another writer claimed it first). ``on_uploaded(key)`` runs after
    each file (a seam for progress, and for tests that kill a publisher half way)."""
    fs = filesystem(url)
    files = {p.relative_to(local).as_posix(): p for p in _files(local)}
    marker = {"files": {rel: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                        for rel, p in files.items()}}
    with translated(url, action="write"):
        if exclusive:
            fs.pipe_file(f"{_key(url)}/{CLAIM}", b"", mode="create")
        elif fs.exists(f"{_key(url)}/{MARKER}"):
            fs.rm_file(f"{_key(url)}/{MARKER}")  # unpublished while it changes
        for rel, p in files.items():
            fs.put_file(str(p), f"{_key(url)}/{rel}")
            if on_uploaded is not None:
                on_uploaded(f"{url}/{rel}")
        fs.pipe_file(f"{_key(url)}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
    return marker


def read_marker(url: str) -> dict[str, Any] | None:
    """A published folder's marker; None while it is unpublished (or absent)."""
    fs = filesystem(url)
    with translated(url, action="read"):
        try:
            return json.loads(fs.cat_file(f"{_key(url)}/{MARKER}"))
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return None


def published(url: str, pattern: str) -> list[str]:
    """The published folders ``url/<pattern>`` (a glob of folder names), by URL."""
    fs = filesystem(url)
    with translated(url, action="list"):
        check_reachable(fs, url)  # a glob in a missing bucket finds nothing, silently
        hits = fs.glob(f"{_key(url)}/{pattern}/{MARKER}")
    scheme = url.split("://", 1)[0]
    return sorted(f"{scheme}://{h.rsplit('/', 1)[0]}" for h in hits)


def children(url: str, pattern: str) -> list[str]:
    """The names of the folders ``url/<pattern>`` holding any object, published or not."""
    fs = filesystem(url)
    with translated(url, action="list"):
        hits = fs.glob(f"{_key(url)}/{pattern}/*")
    return sorted({h.rstrip("/").rsplit("/", 2)[-2] for h in hits})


def fetch_dir(url: str, local: Path) -> bool:
    """Download a published folder into ``local`` (under a temporary name, checked against
    its marker, then renamed); False if it is not published. A ``local`` already holding
    that marker is kept."""
    marker = read_marker(url)
    if marker is None:
        return False
    if (local / MARKER).is_file() and json.loads((local / MARKER).read_text()) == marker:
        return True
    fs = filesystem(url)
    tmp = local.with_name(f".{local.name}.fetch-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with translated(url, action="read"):
            for rel, info in marker["files"].items():
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise StorageError(f"{url}/{MARKER} names {rel!r}, outside the folder")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{_key(url)}/{rel}", str(tmp / rel))
                if file_sha256(tmp / rel) != info["sha256"]:
                    raise StorageError(f"{url}/{rel} does not match its published SHA-256; "
                                       "it changed after publishing")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True))
    old = local.with_name(f".{local.name}.old-{os.getpid()}")
    if local.exists():
        os.replace(local, old)
    os.replace(tmp, local)
    shutil.rmtree(old, ignore_errors=True)
    return True


def put_text(url: str, text: str) -> None:
    """One small object (a single PUT: readers see the old or the new one whole)."""
    put_bytes(url, text.encode())


def put_bytes(url: str, data: bytes) -> None:
    with translated(url, action="write"):
        filesystem(url).pipe_file(_key(url), data)


def get_bytes(url: str) -> bytes:
    with translated(url, action="read"):
        return filesystem(url).cat_file(_key(url))


def etag(info: dict[str, Any]) -> str:
    """An object's ETag from an fsspec ``info`` record, as the stores spell it (s3fs: ETag,
    quoted; gcsfs: etag; adlfs: md5)."""
    return str(info.get("ETag") or info.get("etag") or info.get("md5") or "").strip('"')


def mark_published(url: str) -> dict[str, Any]:
    """Publish a folder whose files were written in place (by several writers: DCP's ranks):
    its marker lists them with their sizes and ETags, and is written last."""
    fs = filesystem(url)
    with translated(url, action="write"):
        infos = fs.find(_key(url), detail=True)
        marker = {"files": {
            name[len(_key(url)) + 1:]: {"bytes": int(i["size"]), "etag": etag(i)}
            for name, i in sorted(infos.items()) if not name.endswith(f"/{MARKER}")}}
        fs.pipe_file(f"{_key(url)}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
    return marker


def unpublish(url: str) -> None:
    """Remove a published folder: its marker first (readers stop seeing it), then the rest."""
    fs = filesystem(url)
    with translated(url, action="remove"):
        if fs.exists(f"{_key(url)}/{MARKER}"):
            fs.rm_file(f"{_key(url)}/{MARKER}")
        if fs.exists(_key(url)):
            fs.rm(_key(url), recursive=True)


def get_text(url: str) -> str | None:
    fs = filesystem(url)
    with translated(url, action="read"):
        try:
            return fs.cat_file(_key(url)).decode()
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return None


def mirror_objects(url: str, local: Path, *, suffixes: tuple[str, ...]) -> list[Path]:
    """Download the objects directly under ``url`` (with one of ``suffixes``) that ``local``
    lacks, each under a hidden name then renamed, its modification time the object's; an
    object on S3 is complete once listed (a PUT is atomic). Returns the new files."""
    fs = filesystem(url)
    local.mkdir(parents=True, exist_ok=True)
    new = []
    with translated(url, action="list"):
        check_reachable(fs, url)
        infos = fs.ls(_key(url), detail=True)
        for info in sorted(infos, key=lambda i: i["name"]):
            name = info["name"].rsplit("/", 1)[-1]
            if info.get("type") != "file" or not name.lower().endswith(suffixes) \
                    or name.startswith(".") or (local / name).is_file():
                continue
            tmp = local / f".{name}.fetch-{os.getpid()}"
            fs.get_file(info["name"], str(tmp))
            stamp = info.get("LastModified")
            if stamp is not None:
                os.utime(tmp, (stamp.timestamp(), stamp.timestamp()))
            os.replace(tmp, local / name)
            new.append(local / name)
    return new


def publish(path: Path) -> str | None:
    """Publish a mirror folder to the URL it stands for; None (nothing to do) if local."""
    url = remote_of(path)
    if url is not None:
        publish_dir(Path(path), url)
    return url
