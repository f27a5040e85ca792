"""Byte-level token sequences cut from local text files (for the transformer)."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from distml.data.sources.base import Chunk, RawChunk, Source
from distml.errors import DataError


def expand_text_paths(patterns: list[str]) -> list[Path]:
    """Expand globs; 'stdlib:' stands for the Python standard library's folder."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for pattern in patterns:
        if pattern.startswith("stdlib:"):
            full = str(stdlib / pattern.removeprefix("stdlib:"))
        else:
            full = str(Path(pattern).expanduser())
        matches = sorted(Path(m) for m in glob.glob(full, recursive=True))
        files.extend(m for m in matches if m.is_file())
    return files


class Text(Source):
    """The files' bytes in one piece, cut into windows of ``sequence_length`` + 1 tokens."""

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src = self.spec
        files = self.files()
        if not files:
            raise DataError(f"data.source.paths={src.paths} matches no file")
        chunks, total = [], 0
        for f in files:
            chunk_bytes = f.read_bytes() + b"\n"
            chunks.append(chunk_bytes)
            total += len(chunk_bytes)
            if src.max_bytes is not None and total >= src.max_bytes:
                break
        data = np.frombuffer(b"".join(chunks)[: src.max_bytes], dtype=np.uint8)
        t = src.sequence_length
        n = (len(data) - 1) // t
        if n < 1:
            raise DataError(
                f"data.source: {len(data)} bytes of text is shorter than one sequence of "
                f"sequence_length={t} tokens; add files or lower sequence_length"
            )
        # Windows of T+1 bytes with stride T: inputs are [:T], next-token targets are [1:].
        windows = np.lib.stride_tricks.sliding_window_view(data, t + 1)[::t][:n].copy()
        return RawChunk({}, None, windows)

    def files(self) -> list[Path]:
        return expand_text_paths(self.spec.paths)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "source": "text"}
