"""A CSV or Parquet file, or a folder of them, with one label column: one chunk per file.
The path may be a storage URL (``s3://bucket/prefix/``, ``s3://bucket/prefix/*.parquet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distml import storage
from distml.data.sources.base import Chunk, RawChunk, Source
from distml.data.tables import list_files, list_remote, raw_columns, read_table
from distml.data.versions import checksums
from distml.errors import DataError


class Files(Source):
    """Each file (or object) is a work item; its bytes (SHA-256), or a remote object's ETag
    and size, identify the content."""

    def plan_chunks(self, rows_per_partition: int) -> list[Chunk]:
        return [Chunk(i, f["path"], f["path"]) for i, f in enumerate(self.inputs())]

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src = self.spec
        path: Path | str = chunk.path if storage.as_url(chunk.path) else Path(chunk.path)
        table = read_table(path)
        if src.label_column not in table.column_names:
            raise DataError(
                f"data.source.label_column={src.label_column!r} is not a column of {path}; "
                f"columns: {', '.join(table.column_names)}"
            )
        features = src.feature_columns or [
            c for c in table.column_names if c != src.label_column]
        missing = [c for c in features if c not in table.column_names]
        if missing:
            raise DataError(f"data.source.feature_columns: {missing} are not columns of {path}")
        labels = table[src.label_column].to_numpy(zero_copy_only=False)
        return RawChunk(raw_columns(table, features), labels)

    def files(self) -> list[Path]:
        return [] if self._url() else list_files(Path(self.spec.path))

    def inputs(self) -> list[dict[str, Any]]:
        url = self._url()
        return list_remote(url) if url else checksums(self.files())

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self._url() or str(self.spec.path), "files": self.inputs()}

    def _url(self) -> str | None:
        return storage.as_url(str(self.spec.path))
