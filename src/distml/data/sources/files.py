"""A CSV or Parquet file, or a folder of them, with one label column: one chunk per file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distml.data.sources.base import Chunk, RawChunk, Source
from distml.data.tables import list_files, raw_columns, read_table
from distml.errors import DataError


class Files(Source):
    """Each file is a work item; its size and time identify the content."""

    def plan_chunks(self, rows_per_partition: int) -> list[Chunk]:
        return [Chunk(i, str(f), str(f)) for i, f in enumerate(self.files())]

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src, path = self.spec, Path(chunk.path)
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
        return list_files(self.spec.path)

    def fingerprint(self) -> dict[str, Any]:
        return {"source": str(self.spec.path), "files": [
            {"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in self.files()]}
