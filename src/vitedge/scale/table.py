"""The Parquet feature table that ``vitedge encode --out FILE.parquet`` writes, and how a rerun resumes it.

One row per encoded input: ``key`` (the content digest the feature cache uses), ``path``, ``shape`` (of one
feature, e.g. ``[197, 192]``) and ``feature`` (the values, float32, flattened in row-major order). The file's
schema metadata names the cache namespace (model, weights, preprocessing, ``-O`` stack, version) that computed
the features, so a rerun with another model cannot append to it.

While a job runs, finished batches land as part files in ``FILE.parquet.parts/`` (each written under a
temporary name and renamed, so a part is whole or absent); :meth:`FeatureTable.finish` merges the table and
its parts into the final file (keeping each path once) and removes the parts. A job that dies leaves its
parts, and the rerun skips every path that the table or a part already holds. Bad inputs go to
``FILE.errors.parquet`` (path, reason). Only pyarrow: no pickle touches the disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ERRORS_SCHEMA",
    "SCHEMA",
    "FeatureTable",
    "read_features",
]

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("feature", pa.list_(pa.float32())),
    ]
)
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
_META_KEY = b"vitedge"


class FeatureTable:
    """The output of one encoding job: a Parquet file, its part files while it runs, and its errors table.

    Args:
        out: the final file; must end in ``.parquet``.
        namespace: the cache namespace digest of the model and stack computing the features.
        meta: what else the file's metadata records (model id, ``-O`` strings).

    Raises:
        ValueError: ``out`` does not end in ``.parquet``, or it (or its parts) holds features of another
            namespace.
    """

    def __init__(self, out: str | Path, *, namespace: str, meta: dict[str, Any] | None = None) -> None:
        self.out = Path(out).expanduser()
        if self.out.suffix != ".parquet":
            raise ValueError(f"--out must name a .parquet file, got {str(out)!r}")
        if self.out.is_dir():
            raise ValueError(f"--out {self.out} is a folder; name a .parquet file")
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.errors_path = self.out.with_name(self.out.stem + ".errors.parquet")
        self.namespace = namespace
        self._meta = {"namespace": namespace, **(meta or {})}
        self._next_part = 0
        for f in self._existing_files():
            theirs = _namespace_of(f)
            if theirs != namespace:
                raise ValueError(
                    f"{f} holds features of another model or stack (namespace {theirs}, this run "
                    f"{namespace}); choose another --out or delete it"
                )
        if self.parts.is_dir():
            numbers = [int(p.stem.split("-")[1]) for p in self.parts.glob("part-*.parquet")]
            self._next_part = max(numbers, default=-1) + 1

    def _existing_files(self) -> list[Path]:
        files = [self.out] if self.out.is_file() else []
        if self.parts.is_dir():
            files += sorted(self.parts.glob("part-*.parquet"))
        return files

    def done_paths(self) -> set[str]:
        """Paths the table or its parts already hold (a rerun skips them)."""
        done: set[str] = set()
        for f in self._existing_files():
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        return done

    def write_part(
        self, keys: Sequence[str], paths: Sequence[str], features: np.ndarray
    ) -> int:  # features: (B, N, D) or (B, D)
        """Write one finished batch as a part file (atomically); returns the rows written."""
        if not len(paths):
            return 0
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if len(keys) != len(paths) or feats.shape[0] != len(paths):
            raise ValueError(
                f"a batch needs as many keys, paths and features, got {len(keys)}, {len(paths)}, "
                f"{feats.shape[0]}"
            )
        shape = list(feats.shape[1:])
        flat = feats.reshape(len(paths), -1)  # (B, N*D)
        table = pa.Table.from_arrays(
            [
                pa.array(keys, pa.string()),
                pa.array(paths, pa.string()),
                pa.array([shape] * len(paths), pa.list_(pa.int32())),
                pa.ListArray.from_arrays(
                    pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)),
                    pa.array(flat.reshape(-1)),
                ),
            ],
            schema=self._schema(SCHEMA),
        )
        self.parts.mkdir(parents=True, exist_ok=True)
        _write_atomic(table, self.parts / f"part-{self._next_part:06d}.parquet")
        self._next_part += 1
        return len(paths)

    def finish(self, errors: Iterable[dict[str, str]] = ()) -> dict[str, int]:
        """Merge the table and its parts into ``out`` (each path once), remove the parts, write the errors.

        Returns:
            ``rows`` in the final file and ``duplicates_dropped`` (rows whose path an earlier row held).
        """
        files = self._existing_files()
        tables = [pq.read_table(f) for f in files]
        merged = (
            pa.concat_tables([t.cast(self._schema(SCHEMA)) for t in tables])
            if tables
            else self._schema(SCHEMA).empty_table()
        )
        seen: set[str] = set()
        keep = []
        for i, p in enumerate(merged.column("path").to_pylist()):
            if p not in seen:
                seen.add(p)
                keep.append(i)
        dropped = merged.num_rows - len(keep)
        if dropped:
            merged = merged.take(pa.array(keep, pa.int64()))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(merged.replace_schema_metadata(self._schema(SCHEMA).metadata), self.out)
        for f in files:
            if f != self.out:
                f.unlink()
        if self.parts.is_dir():
            self.parts.rmdir()
        errs = list(errors)
        if errs or self.errors_path.exists():
            table = pa.Table.from_pylist(
                [{"path": e["path"], "reason": e["reason"]} for e in errs], schema=ERRORS_SCHEMA
            )
            _write_atomic(table, self.errors_path)
        return {"rows": merged.num_rows, "duplicates_dropped": dropped}

    def _schema(self, schema: pa.Schema) -> pa.Schema:
        return schema.with_metadata({_META_KEY: json.dumps(self._meta, sort_keys=True).encode()})


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _namespace_of(path: Path) -> str | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    return None if raw is None else json.loads(raw).get("namespace")


def read_features(path: str | Path) -> tuple[list[str], list[str], np.ndarray, dict[str, Any]]:
    """A feature table -> ``(keys, paths, features (B, *shape) float32, metadata)``.

    Raises:
        ValueError: the file is not a vitedge feature table, or its rows have different shapes.
    """
    table = pq.read_table(path)
    if set(SCHEMA.names) - set(table.column_names):
        raise ValueError(f"{path} is not a vitedge feature table (columns {table.column_names})")
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    shapes = {tuple(s) for s in table.column("shape").to_pylist()}
    if len(shapes) > 1:
        raise ValueError(f"{path} holds features of several shapes {sorted(shapes)}")
    shape = shapes.pop() if shapes else (0,)
    values = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    feats = np.array(values, dtype=np.float32).reshape(table.num_rows, *shape)  # writable: a copy
    return (
        table.column("key").to_pylist(),
        table.column("path").to_pylist(),
        feats,
        meta,
    )
