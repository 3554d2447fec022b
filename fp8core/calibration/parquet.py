"""Parquet calibration data: the native format, read row group by row group, and written by
:func:`write_parquet` (``fixed_shape_tensor`` columns)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fp8core.calibration.source import (
    CalibrationDataError, CalibrationSource, ColumnInfo, PARQUET_SUFFIXES, SHAPE_METADATA_PREFIX,
    _NUMERIC_ONLY, _ROW_GROUP_TARGET_BYTES, _array_column_info, _check_batch_size, _common_length,
    _one_line, _quoted, _refuse_if_too_big,
)


class ParquetSource(CalibrationSource):
    """A data set in one or more Parquet files, read row group by row group."""

    def __init__(self, path: Path, files: list[Path]):
        self._file_list = files
        infos, num_samples = _read_parquet_layout(path, files)
        super().__init__(path, infos, num_samples)

    def _files(self) -> list[Path]:
        return list(self._file_list)

    def _iter_chunks(self, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        first_row = 0
        for file in self._file_list:
            try:
                # pre_buffer (pyarrow's default) keeps every column chunk it read: memory would
                # grow with the file; a 1 MiB read buffer keeps it flat (ResNet50 data: ~185 MB
                # peak for 50 and for 500 samples; 215 and 486 MB with pre_buffer).
                with pq.ParquetFile(file, page_checksum_verification=True, pre_buffer=False,
                                    buffer_size=1 << 20) as parquet:
                    for batch in parquet.iter_batches(batch_size=batch_size, columns=names):
                        yield {
                            name: _column_to_numpy(
                                batch.column(name), self._infos[name], file, first_row
                            )
                            for name in names
                        }
                        first_row += batch.num_rows
            except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # damaged metadata text too
                raise CalibrationDataError(
                    f"cannot read Parquet file {file}: {_one_line(error)}; the file is damaged, "
                    "write it again"
                ) from None


def _parquet_files_in(directory: Path) -> list[Path]:
    # Names starting with '.' or '_' are Spark/Hadoop bookkeeping (_SUCCESS, .crc), not data.
    files = sorted(
        entry
        for entry in directory.iterdir()
        if entry.is_file()
        and entry.suffix.lower() in PARQUET_SUFFIXES
        and not entry.name.startswith((".", "_"))
    )
    if not files:
        raise CalibrationDataError(
            f"calibration data directory {directory} holds no .parquet files; put the data set's "
            "Parquet files in it"
        )
    return files


# --- Parquet layout ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ParquetColumn(ColumnInfo):
    """A Parquet column plus how to turn its cells into an array.

    ``level_sizes``: the expected length of every cell at each list level, outermost first; None
    for a ``fixed_shape_tensor`` (read by pyarrow, which applies its permutation) and ``()`` for a
    plain scalar column.
    """

    level_sizes: tuple[int, ...] | None = ()


def _read_parquet_layout(path: Path, files: list[Path]) -> tuple[list[_ParquetColumn], int]:
    layout: list[_ParquetColumn] | None = None
    num_samples = 0
    for file in files:
        try:
            with pq.ParquetFile(file) as parquet:
                schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
                largest_group = max((parquet.metadata.row_group(i).total_byte_size
                                     for i in range(parquet.metadata.num_row_groups)), default=0)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # damaged metadata text too
            raise CalibrationDataError(
                f"cannot read Parquet file {file}: {_one_line(error)}; the file is damaged or not "
                "Parquet, write it again"
            ) from None
        _refuse_if_too_big(f"a row group of Parquet file {file}", largest_group,
                           "write the file with smaller row groups (fp8-data to-parquet does)")
        file_layout = [_parquet_column(field, schema.metadata or {}) for field in schema]
        if layout is not None and file_layout != layout:
            raise CalibrationDataError(
                f"Parquet file {file} does not match {files[0]} in {path}: "
                f"{_describe_difference(layout, file_layout)}; all files of one data set need the "
                "same columns"
            )
        layout = file_layout
        num_samples += num_rows
    assert layout is not None  # files is never empty
    return layout, num_samples


def _describe_difference(first: list[_ParquetColumn], other: list[_ParquetColumn]) -> str:
    names, other_names = [c.name for c in first], [c.name for c in other]
    if names != other_names:
        return f"columns {_quoted(other_names)} instead of {_quoted(names)}"
    for a, b in zip(first, other):
        if a != b:
            return (
                f"column {a.name!r} is {_describe_column(b)} instead of {_describe_column(a)}"
            )
    return "the layouts differ"


def _describe_column(column: ColumnInfo) -> str:
    if column.problem is not None:
        return f"unreadable ({column.problem})"
    return f"{column.dtype} {column.sample_shape}"


def _parquet_column(field: pa.Field, metadata: Mapping[bytes, bytes]) -> _ParquetColumn:
    name, arrow_type = field.name, field.type
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        shape = list(arrow_type.shape)
        if arrow_type.permutation:
            shape = [shape[axis] for axis in arrow_type.permutation]
        return _leaf_column(name, arrow_type.value_type, tuple(shape), None)

    fixed_sizes: list[int | None] = []  # per list level; None for a variable-length level
    leaf = arrow_type
    while pa.types.is_list(leaf) or pa.types.is_large_list(leaf) or pa.types.is_fixed_size_list(
        leaf
    ):
        fixed_sizes.append(leaf.list_size if pa.types.is_fixed_size_list(leaf) else None)
        leaf = leaf.value_type
    if not fixed_sizes:
        return _leaf_column(name, leaf, (), ())

    recorded = metadata.get(SHAPE_METADATA_PREFIX + name.encode())
    if recorded is not None:
        shape = _parse_recorded_shape(recorded)
        if shape is None:
            return _problem(name, f"has shape metadata {recorded!r}, not a JSON list of ints")
    elif None in fixed_sizes:
        key = (SHAPE_METADATA_PREFIX + name.encode()).decode(errors="replace")
        return _problem(name, f"is a list column without its sample shape in metadata key {key!r}")
    else:
        shape = tuple(fixed_sizes)  # type: ignore[arg-type]

    if not 1 <= len(fixed_sizes) <= len(shape):
        return _problem(name, f"has {len(fixed_sizes)} list levels for sample shape {shape}")
    # Outer levels hold one dimension each; the innermost holds the remaining ones flattened.
    depth = len(fixed_sizes)
    level_sizes = tuple(shape[: depth - 1]) + (math.prod(shape[depth - 1 :]),)
    clash = [
        (fixed, want) for fixed, want in zip(fixed_sizes, level_sizes) if fixed not in (None, want)
    ]
    if clash:
        return _problem(name, f"has fixed list sizes {fixed_sizes} that contradict shape {shape}")
    return _leaf_column(name, leaf, shape, level_sizes)


def _parse_recorded_shape(recorded: bytes) -> tuple[int, ...] | None:
    try:
        shape = json.loads(recorded)
    except ValueError:
        return None
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return None
    return tuple(shape)


def _leaf_column(
    name: str, leaf: pa.DataType, shape: tuple[int, ...], level_sizes: tuple[int, ...] | None
) -> _ParquetColumn:
    if pa.types.is_string(leaf) or pa.types.is_large_string(leaf):
        return _problem(name, f"holds {leaf} values; text for a model's string input is read from .npz "
                              "calibration data (np.savez with a str array), not Parquet")
    if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
        return _problem(name, f"holds {leaf} values{_NUMERIC_ONLY}")
    return _ParquetColumn(name, shape, np.dtype(leaf.to_pandas_dtype()), None, level_sizes)


def _problem(name: str, problem: str) -> _ParquetColumn:
    return _ParquetColumn(name, None, None, problem, ())


def _column_to_numpy(
    column: pa.Array, info: ColumnInfo, file: Path, first_row: int
) -> np.ndarray:
    """Cells of one column of one record batch -> ndarray[rows, *sample_shape] of the column dtype.

    ``first_row`` is the batch's first sample index in the data set, for messages.
    """
    assert isinstance(info, _ParquetColumn) and info.sample_shape is not None
    rows = len(column)
    if info.level_sizes is None:  # fixed_shape_tensor
        _refuse_nulls(column, info.name, file, first_row, per_row=1)
        _refuse_nulls(column.storage.flatten(), info.name, file, first_row,
                      per_row=math.prod(info.sample_shape))  # fmt: skip
        values = column.to_numpy_ndarray()
    else:
        per_row = 1
        for size in info.level_sizes:
            _refuse_nulls(column, info.name, file, first_row, per_row)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(lengths != size)
            if wrong.size:
                sample = first_row + int(wrong[0]) // per_row
                raise CalibrationDataError(
                    f"calibration input {info.name!r} sample {sample} in {file} has "
                    f"{int(lengths[wrong[0]])} values at a list level that should hold {size} "
                    f"(sample shape {info.sample_shape}); give every sample the same shape"
                )
            column = column.flatten()
            per_row *= size
        _refuse_nulls(column, info.name, file, first_row, per_row)
        values = column.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=info.dtype).reshape((rows, *info.sample_shape))


def _refuse_nulls(array: pa.Array, name: str, file: Path, first_row: int, per_row: int) -> None:
    if array.null_count:
        index = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise CalibrationDataError(
            f"calibration input {name!r} sample {first_row + index // per_row} in {file} has a "
            "missing (null) value; fill or drop that sample"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_parquet(
    arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    row_group_size: int | None = None,
) -> Path:
    """Write ``{name: ndarray[N, ...]}`` as one Parquet file, one row per sample, atomically.

    Arrays of 2+ dimensions become ``fixed_shape_tensor`` columns (bool ones, which that type does
    not allow, nested ``fixed_size_list`` columns); 1-D arrays plain columns. ``row_group_size``
    (rows) defaults to about 64 MiB of samples per row group, the unit a reader decodes at once.
    The file appears complete or not at all (temporary file + ``os.replace``), and carries page
    checksums, which :func:`fp8core.calibration.open_dataset` verifies.
    """
    path = Path(path)
    if not arrays:
        raise CalibrationDataError(f"nothing to write to {path}: no arrays given")
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    for name, array in arrays.items():
        info = _array_column_info(name, array)
        if info.problem is not None:
            raise CalibrationDataError(
                f"cannot write array {name!r} to {path}: it {info.problem}; give ndarray[N, ...] "
                "of a numeric dtype"
            )
    num_samples = _common_length(path, arrays)
    if row_group_size is None:
        bytes_per_sample = sum(a.nbytes // max(len(a), 1) for a in arrays.values()) or 1
        row_group_size = max(1, _ROW_GROUP_TARGET_BYTES // bytes_per_sample)
    _check_batch_size(row_group_size)
    table = pa.table({name: _to_arrow_column(array) for name, array in arrays.items()})
    assert table.num_rows == num_samples

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target (same file system, so os.replace is atomic); not mkstemp,
    # whose 0600 mode would survive the rename and ignore the user's umask.
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        # Page checksums let the reader tell a damaged file from data (Parquet has none by default).
        pq.write_table(table, temporary, row_group_size=row_group_size, write_page_checksum=True)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _to_arrow_column(array: np.ndarray) -> pa.Array:
    array = np.ascontiguousarray(array)
    if array.ndim == 1:
        return pa.array(array)
    sample_shape = array.shape[1:]
    flat = pa.array(array.reshape(-1))
    if array.dtype == np.bool_:
        column = flat
        for size in reversed(sample_shape):
            column = pa.FixedSizeListArray.from_arrays(column, size)
        return column
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(sample_shape))
    tensor_type = pa.fixed_shape_tensor(flat.type, list(sample_shape))
    return pa.ExtensionArray.from_storage(tensor_type, storage)
