"""What every data source does, and the table of sources by name.

The config holds a source's validated spec; the behaviour (how it is cut into chunks, how a
chunk loads, which files identify it) is a ``Source`` built around that spec. ``SOURCES``
names each kind's implementation by import path, the same path a user's 'module:Class'
takes, so this module imports none of them. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distml.data.versions import checksums
from distml.imports import load_object

# Sources by the config's ``data.source.type`` -> import path of their Source class.
SOURCES: dict[str, str] = {
    "sklearn:digits": "distml.data.sources.digits:Digits",
    "synthetic:classification": "distml.data.sources.synthetic:SyntheticClassification",
    "synthetic:regression": "distml.data.sources.synthetic:SyntheticRegression",
    "synthetic:clicks": "distml.data.sources.clicks:Clicks",
    "text": "distml.data.sources.text:Text",
    "file": "distml.data.sources.files:Files",
}


@dataclass(frozen=True)
class Chunk:
    """One work item: rows [start, stop) of a generated source, or one file."""

    index: int
    label: str
    path: str | None = None
    start: int = 0
    stop: int = 0


@dataclass
class RawChunk:
    """A chunk before validation and transforms.

    ``columns``: raw feature columns, float32 (nulls as NaN) or str (categorical);
    ``labels``: raw label values, None for text; ``tokens``: (N, T+1) uint8 byte windows
    for text, else None.
    """

    columns: dict[str, np.ndarray]
    labels: np.ndarray | None
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        if self.tokens is not None:
            return len(self.tokens)
        return len(self.labels) if self.labels is not None else 0


class Source:
    """What every source answers, around its config ``spec``; the defaults suit a source that
    loads in one piece. Sources are rebuilt from the spec in each worker, so keep no state
    beyond it."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def plan_chunks(self, rows_per_partition: int) -> list[Chunk]:
        """The independent work items of ingestion (cheap: runs in the driver)."""
        return [Chunk(0, self.spec.type)]

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        """One chunk's raw rows (runs in a worker)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files the data comes from (their size and time are part of the cache key)."""
        return []

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's content, for the manifest and the data version: the
        spec, and each input file's size and SHA-256 (``files``)."""
        spec = self.spec.model_dump(mode="json")
        return {"source": spec.get("type"), "spec": spec,
                "files": checksums(self.files())}


def open_source(spec: Any) -> Source:
    """The Source for a config's ``data.source`` spec, by its type (or 'module:Class')."""
    return load_object(SOURCES.get(spec.type, spec.type), what="source")(spec)
