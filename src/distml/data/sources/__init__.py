"""Data sources, cut into chunks: the independent work items of parallel ingestion.
See ``base.Source``; each kind is a module here, named in ``base.SOURCES``."""

from __future__ import annotations

from distml.data.sources.base import SOURCES, Chunk, RawChunk, Source, open_source

__all__ = ["SOURCES", "Chunk", "RawChunk", "Source", "open_source"]
