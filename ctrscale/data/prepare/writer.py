"""Writing and publishing one day: encoded tables → `DIR/day=N/` with its manifest.

Owns the partition writer (exact row groups, a fixed number per file, in a background
thread) and the publishing protocol: a day is written into a hidden temp directory, its
`_manifest.json` (rows and sha256 per file) added, and the directory renamed into place by
`ctrscale.files.publish_dir`, so readers see the old day or the complete new one, never a mix.
"""

from __future__ import annotations

import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.prepare.encoding import Encoding
from ctrscale.data.prepare.parse import InputStats, check_rejects, scan
from ctrscale.data.schema import sha256_file
from ctrscale.files import publish_dir, write_json_atomic

ROW_GROUPS_PER_FILE = 16
MANIFEST_FILE = "_manifest.json"
TMP_PREFIX = ".tmp-"


class PartitionWriter:
    """Parts of one day in a hidden temp dir: exact row groups, a fixed number per file.

    Writes run in a background thread, one table behind the parser, so encoding the next
    chunk overlaps Parquet encoding and disk I/O while memory stays at a couple of chunks.
    """

    def __init__(self, tmp_dir: Path, row_group_rows: int) -> None:
        self.tmp_dir = tmp_dir
        self.row_group_rows = row_group_rows
        self.files: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._last: Future | None = None

    def write(self, table: pa.Table) -> None:
        self._wait()
        self._last = self._pool.submit(self._add, table)

    def finish(self) -> list[dict[str, Any]]:
        """Flush the last rows and close; the per-file list for the manifest."""
        self._wait()
        self._pool.submit(self._flush_all).result()
        self._pool.shutdown()
        return self.files

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        if self._writer is not None:
            self._writer.close()

    def _wait(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def _add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            whole = self._pending_rows - self._pending_rows % self.row_group_rows
            self._write_rows(whole)

    def _flush_all(self) -> None:
        if self._pending_rows:
            self._write_rows(self._pending_rows)
        self._close_file()

    def _write_rows(self, count: int) -> None:
        """Write the first `count` pending rows, rolling files every ROW_GROUPS_PER_FILE groups."""
        pending = pa.concat_tables(self._pending)
        written = 0
        while written < count:
            if self._writer is None:
                self._open_file()
            room = ROW_GROUPS_PER_FILE * self.row_group_rows - self._file_rows
            take = min(room, count - written)
            self._writer.write_table(
                pending.slice(written, take), row_group_size=self.row_group_rows
            )
            self._file_rows += take
            written += take
            if self._file_rows == ROW_GROUPS_PER_FILE * self.row_group_rows:
                self._close_file()
        rest = pending.slice(count)
        self._pending, self._pending_rows = [rest], rest.num_rows

    def _open_file(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(
            self.tmp_dir / name, schema.PARQUET_SCHEMA, compression="zstd"
        )
        self.files.append({"path": name, "rows": 0, "sha256": None})
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        entry = self.files[-1]
        entry["rows"] = self._file_rows
        entry["sha256"] = sha256_file(self.tmp_dir / entry["path"], sync=True)


def convert_day(
    stats: InputStats,
    encoding: Encoding,
    out_dir: Path,
    row_group_rows: int,
    max_reject_fraction: float,
) -> None:
    """Write one input as `out_dir/day=N/`; nothing becomes visible unless it all succeeds."""
    day = stats.day
    tmp_dir = out_dir / f"{TMP_PREFIX}day={day}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    writer = PartitionWriter(tmp_dir, row_group_rows)
    started = time.perf_counter()
    try:
        for parsed in scan(stats):
            if parsed.valid.height:
                writer.write(encoding.encode(parsed.valid))
        files = writer.finish()
        check_rejects(stats, max_reject_fraction, out_dir)
        manifest = {
            "day": day,
            "source": str(stats.source),
            "rows": stats.rows_out,
            "positives": stats.positives,
            "files": files,
        }
        write_json_atomic(tmp_dir / MANIFEST_FILE, manifest)
        publish_dir(tmp_dir, out_dir / f"day={day}")
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        stats.seconds = time.perf_counter() - started
