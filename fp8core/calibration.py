"""Calibration data ingestion (SPEC section 5): open a data set, read it in batches, check it fits.

A calibration data set is a table: one column per model input, one row per sample, each cell one
sample's tensor, already preprocessed (what is stored is what the model receives). Formats:

* **Parquet** (native), a file or a directory of ``*.parquet`` files read in name order as one data
  set (their columns must agree). A column holds one of:

  - an Arrow ``fixed_shape_tensor`` extension column (what :func:`write_parquet` writes);
  - nested ``fixed_size_list`` columns (the shape is in the type);
  - (nested) variable ``list`` columns with the per-sample shape in the schema metadata under
    ``b"fp8.shape.<column>"`` as a JSON list, e.g. ``b"[3, 224, 224]"``. With fewer list levels
    than dimensions, the innermost level holds the remaining dimensions flattened (row-major);
  - a plain numeric column: one scalar per sample (sample shape ``()``).

  Columns of other kinds (strings, structs, lists without a recorded shape) may exist, e.g. a
  label; they are listed, and refused only when a caller asks to read them.
  Parquet is read row group by row group (``ParquetFile.iter_batches``), never whole.
* **.npz**: ``{name: ndarray[N, ...]}``, loaded with ``allow_pickle=False``.
* **.pkl / .pickle**: PopRT's ``{input_name: ndarray[N, ...]}`` (a value may also be a list of
  per-sample arrays of one shape, which are stacked). Pickle runs code on load, so it is read only
  through :class:`_ArrayOnlyUnpickler`, which resolves nothing but the few numpy globals a plain
  array needs; any other global is refused before anything runs.

Every user-facing problem raises :class:`CalibrationDataError` with a one-line message naming the
file, input or sample and how to fix it.
"""

from __future__ import annotations

import abc
import codecs
import dataclasses
import hashlib
import json
import math
import os
import pickle
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fp8core.errors import FP8Error

PARQUET_SUFFIXES = (".parquet",)
NPZ_SUFFIXES = (".npz",)
PICKLE_SUFFIXES = (".pkl", ".pickle")
SHAPE_METADATA_PREFIX = b"fp8.shape."

# A row group is the unit the Parquet reader decodes at once, so its size bounds reader memory.
_ROW_GROUP_TARGET_BYTES = 64 * 2**20
_FINGERPRINT_CHUNK_BYTES = 2**20


class CalibrationDataError(FP8Error):
    """The calibration data cannot be used; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------
# Columns and sources
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ColumnInfo:
    """One column of a data set: per-sample shape and dtype, or why it is not a tensor column."""

    name: str
    sample_shape: tuple[int, ...] | None
    dtype: np.dtype | None
    problem: str | None = None

    @property
    def readable(self) -> bool:
        return self.problem is None


class CalibrationSource(abc.ABC):
    """A calibration data set: named columns of per-sample tensors, read in batches.

    ``iter_batches`` yields exactly ``batch_size`` samples per batch except possibly the last,
    whatever the file and row-group boundaries are, so concatenating the batches gives the data set
    in order.
    """

    def __init__(self, path: Path, infos: Iterable[ColumnInfo], num_samples: int):
        self.path = path
        self._infos = {info.name: info for info in infos}
        self.num_samples = num_samples
        self._fingerprint: str | None = None

    @property
    def columns(self) -> list[str]:
        return list(self._infos)

    def column_info(self, name: str) -> ColumnInfo:
        if name not in self._infos:
            raise CalibrationDataError(
                f"calibration data {self.path} has no column {name!r}; its columns are "
                f"{_quoted(self._infos)}"
            )
        return self._infos[name]

    def sample_shape(self, name: str) -> tuple[int, ...]:
        return self._readable_info(name).sample_shape  # type: ignore[return-value]

    def dtype(self, name: str) -> np.dtype:
        return self._readable_info(name).dtype  # type: ignore[return-value]

    def iter_batches(
        self, batch_size: int, names: Iterable[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: ndarray[b, *sample_shape]}``, b = batch_size (the last may be smaller).

        ``names`` selects columns (default: all); columns not named are not read.
        """
        _check_batch_size(batch_size)
        selected = list(self._infos) if names is None else list(names)
        batch_bytes = 0
        for name in selected:
            info = self._readable_info(name)
            batch_bytes += math.prod(info.sample_shape) * info.dtype.itemsize * min(batch_size, max(self.num_samples, 1))
        _refuse_if_too_big(f"a batch of {batch_size} samples of {self.path}", batch_bytes, "lower --batch_size")
        return _rebatch(self._iter_chunks(selected, batch_size), selected, batch_size)

    def fingerprint(self) -> str:
        """sha256 hex digest of the data files, in read order, streamed; computed once, cached.

        For each file: its byte length (8 bytes, little endian), then its bytes. The length prefix
        keeps two different splits of the same bytes apart; file names are not hashed, so a renamed
        copy of the same data has the same fingerprint.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for file in self._files():
                digest.update(file.stat().st_size.to_bytes(8, "little"))
                with open(file, "rb") as handle:
                    while chunk := handle.read(_FINGERPRINT_CHUNK_BYTES):
                        digest.update(chunk)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # --- for subclasses ----------------------------------------------------------------------
    @abc.abstractmethod
    def _files(self) -> list[Path]:
        """The files holding the data, in read order."""

    @abc.abstractmethod
    def _iter_chunks(self, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield consecutive chunks of rows of any size (``_rebatch`` evens them out)."""

    def _readable_info(self, name: str) -> ColumnInfo:
        info = self.column_info(name)
        if info.problem is not None:
            raise CalibrationDataError(
                f"calibration data {self.path} column {name!r} {info.problem}; store one tensor "
                "per sample, or leave this column out of the ones read"
            )
        return info


class ArraySource(CalibrationSource):
    """A data set held in memory as ``{name: ndarray[N, ...]}`` (from .npz or pickle)."""

    def __init__(self, path: Path, arrays: Mapping[str, np.ndarray]):
        infos = [_array_column_info(name, array) for name, array in arrays.items()]
        super().__init__(path, infos, _common_length(path, arrays))
        self._arrays = dict(arrays)

    def _files(self) -> list[Path]:
        return [self.path]

    def _iter_chunks(self, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.num_samples, batch_size):
            # Copies, so a caller editing a batch cannot change the data set.
            yield {name: self._arrays[name][start : start + batch_size].copy() for name in names}


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
                # grow with the file; a 1 MiB read buffer keeps it flat (ResNet50 data: 50 and 500
                # samples both ~185 MB peak instead of 215 -> 486 MB).
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


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------
def open_dataset(path: str | os.PathLike) -> CalibrationSource:
    """Open a calibration data set by its path; the format is chosen by the suffix (see module)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"calibration data {path} does not exist; check the path")
    if path.is_dir():
        return ParquetSource(path, _parquet_files_in(path))
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return ParquetSource(path, [path])
    if suffix in NPZ_SUFFIXES:
        return ArraySource(path, _load_npz(path))
    if suffix in PICKLE_SUFFIXES:
        return ArraySource(path, _load_pickle(path))
    known = ", ".join(PARQUET_SUFFIXES + NPZ_SUFFIXES + PICKLE_SUFFIXES)
    raise CalibrationDataError(
        f"calibration data {path} has unknown type {suffix or '(no suffix)'!r}; use one of "
        f"{known}, or a directory of .parquet files"
    )


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


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    # Checked first: on a non-zip file np.load falls back to unpickling, and would report a
    # misleading "object arrays need allow_pickle" for plain damage.
    if not zipfile.is_zipfile(path):
        raise CalibrationDataError(
            f"calibration data {path} is not a .npz (zip) archive; the file is damaged or of "
            "another type, write it again with numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                _check_npz_member(path, archive.zip, name)
            return {name: archive[name] for name in archive.files}
    except CalibrationDataError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise CalibrationDataError(
                f"calibration data {path} holds an object array, which needs pickle to load and "
                "is refused; save numeric arrays only"
            ) from None
        raise _damaged(path, error) from None
    except Exception as error:
        # zipfile and numpy's .npy reader raise many types on damaged bytes (BadZipFile,
        # zlib.error, EOFError, NotImplementedError, RuntimeError "encrypted", KeyError...);
        # every one of them, on a file we only read, means the file is damaged.
        raise _damaged(path, error) from None


def _check_npz_member(path: Path, archive: zipfile.ZipFile, name: str) -> None:
    """Read one member's .npy header and refuse, before anything is allocated, an array larger
    than the member's declared uncompressed size (damage) or than the free memory (a zip bomb)."""
    member = name if name in archive.namelist() else f"{name}.npy"
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        # numpy parses the header text with ast/tokenize: damage there surfaces as SyntaxError
        # or tokenize.TokenError, which _load_npz reports as a damaged file.
        shape, _, dtype = read_header(handle)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > archive.getinfo(member).file_size:
        raise CalibrationDataError(
            f"calibration data {path} array {name!r} declares {nbytes} bytes but holds "
            f"{archive.getinfo(member).file_size}; the file is damaged, write it again"
        )
    _refuse_if_too_big(f"calibration data {path} array {name!r}", nbytes, "split the data into smaller files")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; 2**63 if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def _refuse_if_too_big(what: str, nbytes: int, fix: str) -> None:
    """Untrusted sizes (npz headers, Parquet metadata) are checked against free memory first."""
    available = available_memory_bytes()
    if nbytes > available:
        raise CalibrationDataError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory "
            f"is free; {fix}"
        )


def _damaged(path: Path, error: BaseException) -> CalibrationDataError:
    return CalibrationDataError(
        f"cannot read calibration data {path}: {_one_line(error)}; the file is damaged or not of "
        "its suffix's type, write it again"
    )


# --- pickle: dicts of plain numpy arrays, nothing else ---------------------------------------
class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for code outside the allowed table; the message names it."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What pickles of protocol < 3 call as ``_codecs.encode`` to rebuild bytes; latin1 only."""
    if encoding != "latin1":
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    # Resolved from the real module: importing the numpy.core alias warns on numpy 2.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    reconstruct, frombuffer = multiarray._reconstruct, numeric._frombuffer
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # numpy 1 pickles, protocol <= 4
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy 2 pickles, protocol <= 4
        ("numpy.core.numeric", "_frombuffer"): frombuffer,  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): dict,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists and numpy arrays of plain dtypes, and nothing else.

    ``find_class`` is the only way a pickle reaches code; it answers from a fixed table and refuses
    every other global, so a malicious pickle fails before it runs anything.
    """

    _allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(_printable(f"{module}.{name}")) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"a persistent id ({type(pid).__name__})")


def _printable(text: str, limit: int = 80) -> str:
    """Names read from an untrusted pickle, safe for a one-line message."""
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])


def _load_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            loaded = _ArrayOnlyUnpickler(handle).load()
    except _RefusedGlobal as refused:
        raise CalibrationDataError(
            f"calibration pickle {path} refers to {refused}, which is not a numpy array part; "
            "only a dict of numpy arrays is accepted (convert it with 'fp8-data to-parquet' where "
            "it was made, or save it with numpy.savez)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, OSError) as error:  # fmt: skip
        raise _damaged(path, error) from None
    if not isinstance(loaded, dict):
        raise CalibrationDataError(
            f"calibration pickle {path} holds a {type(loaded).__name__}, not a dict; store "
            "{input_name: ndarray[N, ...]}"
        )
    return {
        _pickle_key(path, key): _pickle_value(path, key, value) for key, value in loaded.items()
    }


def _pickle_key(path: Path, key: Any) -> str:
    if not isinstance(key, str):
        raise CalibrationDataError(
            f"calibration pickle {path} has a key {key!r} that is not a string; key each array by "
            "its model input name"
        )
    return key


def _pickle_value(path: Path, key: str, value: Any) -> np.ndarray:
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        shapes = {v.shape for v in value}
        if len(shapes) > 1:
            raise CalibrationDataError(
                f"calibration pickle {path} input {key!r} is a list of arrays of different shapes "
                f"{sorted(shapes)}; give every sample the same shape"
            )
        value = np.stack(value)
    if not isinstance(value, np.ndarray):
        raise CalibrationDataError(
            f"calibration pickle {path} input {key!r} is a {type(value).__name__}, not a numpy "
            "array; store ndarray[N, ...] per input"
        )
    if value.dtype.hasobject:
        raise CalibrationDataError(
            f"calibration pickle {path} input {key!r} is an object array; store numeric arrays"
        )
    return value


# --- in-memory arrays ----------------------------------------------------------------------
def _array_column_info(name: str, array: np.ndarray) -> ColumnInfo:
    if array.ndim == 0:
        return ColumnInfo(name, None, None, "is a single value with no sample axis")
    if not _is_numeric(array.dtype):
        return ColumnInfo(name, None, None, f"holds {array.dtype} values{_NUMERIC_ONLY}")
    return ColumnInfo(name, tuple(array.shape[1:]), array.dtype)


def _common_length(path: Path, arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise CalibrationDataError(
            f"calibration data {path} holds no arrays; store one array per model input"
        )
    lengths = {name: len(array) for name, array in arrays.items() if array.ndim > 0}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
        raise CalibrationDataError(
            f"calibration data {path} arrays have different sample counts ({listed}); the first "
            "axis of every array is the sample axis and must have the same length (store an input "
            "batched on another axis per sample, e.g. a state [2, batch, 128] as [N, 2, 128], and a "
            "scalar input as [N])"
        )
    return next(iter(lengths.values()), 0)


_NUMERIC_ONLY = "; only bool, integer and float tensors are supported"


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf"


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


# --- batching ------------------------------------------------------------------------------
def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"batch size {batch_size!r} is not a positive integer")


def _rebatch(
    chunks: Iterator[dict[str, np.ndarray]], names: list[str], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Regroup row chunks of any sizes into batches of exactly ``batch_size`` rows (last: rest)."""
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for chunk in chunks:
        rows = len(chunk[names[0]]) if names else 0
        if rows == 0:
            continue
        pending.append(chunk)
        pending_rows += rows
        while pending_rows >= batch_size:
            merged = _concatenate(pending, names)
            yield {name: merged[name][:batch_size] for name in names}
            rest = {name: merged[name][batch_size:] for name in names}
            pending_rows -= batch_size
            pending = [rest] if pending_rows else []
    if pending_rows:
        yield _concatenate(pending, names)


def _concatenate(chunks: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}


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
    checksums, which :func:`open_dataset` verifies.
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


# --------------------------------------------------------------------------------------------
# Checking the data against the model
# --------------------------------------------------------------------------------------------
Dim = int | str | None
ModelInputSpec = tuple[np.dtype, tuple[Dim, ...] | None, int | None]


def model_input_specs(model: onnx.ModelProto) -> dict[str, ModelInputSpec]:
    """``{name: (numpy dtype, shape, batch axis)}`` of the graph inputs that are not initializers.

    A dimension is an int when fixed, None when symbolic (``dim_param``), unknown, or stored as -1
    or 0; the shape is None when the rank is unknown. The batch axis is where samples are stacked
    (:func:`fp8core.inputs.batch_axes`), None for an input that has none (fed as stored).
    """
    from fp8core.inputs import input_specs

    for graph_input in model.graph.input:
        if graph_input.type.WhichOneof("value") != "tensor_type":
            raise CalibrationDataError(
                f"model input {graph_input.name!r} is not a tensor; calibration supports tensor "
                "inputs only"
            )
    return {spec.name: (spec.dtype, None if spec.dims is None else
                        tuple(d if isinstance(d, int) else None for d in spec.dims), spec.batch_axis)
            for spec in input_specs(model)}


@dataclasses.dataclass(frozen=True)
class InputSummary:
    sample_shape: tuple[int, ...]
    data_dtype: np.dtype
    model_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class ValidationSummary:
    num_samples: int
    inputs: dict[str, InputSummary]


def validate_against_model(
    source: CalibrationSource,
    model_inputs: Mapping[str, tuple],
    batch_size: int,
) -> ValidationSummary:
    """Check that the data set can feed the model, before any long work starts.

    Rules, in order: the data set has samples; every model input has a column; the column holds
    numeric tensors; the per-sample shape has the model's rank minus the batch axis (the whole
    shape for an input with no batch axis: ``(dtype, shape, None)``; a 2-tuple means axis 0) and
    equals every fixed model dimension; a fixed model batch dimension equals ``batch_size`` and divides
    the sample count; the dtype casts to the model's under numpy ``same_kind`` casting (float64 ->
    float32 yes, float -> int64 no). Then one streamed pass: no NaN or Inf, and no value beyond the
    model dtype's range (it would become Inf or wrap). The first failure raises
    :class:`CalibrationDataError`.
    """
    _check_batch_size(batch_size)
    if source.num_samples == 0:
        raise CalibrationDataError(
            f"calibration data {source.path} holds no samples; add samples (PopRT used 20-50)"
        )
    missing = [name for name in model_inputs if name not in source.columns]
    if missing:
        raise CalibrationDataError(
            f"calibration data {source.path} lacks model input(s) {_quoted(missing)}; its columns "
            f"are {_quoted(source.columns)}; name one column after each model input"
        )
    summaries = {}
    for name, spec in model_inputs.items():
        model_dtype, model_shape = np.dtype(spec[0]), spec[1]
        batch_axis = spec[2] if len(spec) > 2 else 0
        sample_shape, data_dtype = source.sample_shape(name), source.dtype(name)
        _check_shape(name, sample_shape, model_shape, batch_axis, batch_size, source.num_samples)
        if not np.can_cast(data_dtype, model_dtype, casting="same_kind"):
            raise CalibrationDataError(
                f"calibration input {name!r} is {data_dtype} but the model takes {model_dtype}, "
                f"and {data_dtype} does not convert to it safely; store it as {model_dtype}"
            )
        summaries[name] = InputSummary(sample_shape, data_dtype, model_dtype)
    _scan_values(source, summaries, batch_size)
    return ValidationSummary(source.num_samples, summaries)


def _check_shape(
    name: str,
    sample_shape: tuple[int, ...],
    model_shape: tuple[Dim, ...] | None,
    batch_axis: int | None,
    batch_size: int,
    num_samples: int,
) -> None:
    if model_shape is None:
        return  # rank unknown: anything goes
    if batch_axis is None:
        expected = tuple(model_shape)
        where = "(the whole input: it has no batch axis)"
    else:
        expected = tuple(model_shape[:batch_axis]) + tuple(model_shape[batch_axis + 1:])
        where = "(batch axis excluded, ? = any)" if batch_axis == 0 else f"(batch axis {batch_axis} excluded, ? = any)"
    fits = len(expected) == len(sample_shape) and all(
        not isinstance(want, int) or want == have for want, have in zip(expected, sample_shape)
    )
    if not fits:
        shown = "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in expected) + ")"
        raise CalibrationDataError(
            f"calibration input {name!r} samples have shape {sample_shape} but the model takes "
            f"{shown} per sample {where}; store samples of the model's shape"
            + ("" if batch_axis is None else ", or give the input's batch axis with --input_batch_axis")
        )
    batch_dim = None if batch_axis is None else model_shape[batch_axis]
    if isinstance(batch_dim, int):
        if batch_size != batch_dim:
            raise CalibrationDataError(
                f"model input {name!r} has a fixed batch size of {batch_dim} but batch size "
                f"{batch_size} was asked; use batch size {batch_dim}"
            )
        if num_samples % batch_dim:
            raise CalibrationDataError(
                f"calibration data has {num_samples} samples, not a multiple of model input "
                f"{name!r}'s fixed batch size {batch_dim}; add or drop samples, or export the "
                "model with a dynamic batch dimension"
            )


def _scan_values(
    source: CalibrationSource, summaries: Mapping[str, InputSummary], batch_size: int
) -> None:
    first_sample = 0
    for batch in source.iter_batches(batch_size, names=list(summaries)):
        for name, values in batch.items():
            problem = _first_bad_sample(values, summaries[name].model_dtype)
            if problem is not None:
                index, what = problem
                raise CalibrationDataError(
                    f"calibration input {name!r} sample {first_sample + index} {what}; fix or "
                    "drop that sample"
                )
        first_sample += len(next(iter(batch.values()))) if batch else 0


def _first_bad_sample(values: np.ndarray, model_dtype: np.dtype) -> tuple[int, str] | None:
    """(sample index within the batch, problem) of the first sample that is not finite in the
    model's dtype, or None. Samples are the first axis."""
    rows = values.reshape(len(values), -1)
    nan = inf = np.zeros(len(rows), bool)
    if values.dtype.kind == "f":
        nan, inf = np.isnan(rows).any(axis=1), np.isinf(rows).any(axis=1)
    if model_dtype.kind == "f":
        finite_rows = np.where(np.isfinite(rows), rows, 0) if values.dtype.kind == "f" else rows
        too_big = (np.abs(finite_rows) > np.finfo(model_dtype).max).any(axis=1)
    elif model_dtype.kind in "iu" and values.dtype.kind in "iu":
        limits = np.iinfo(model_dtype)
        too_big = ((rows < limits.min) | (rows > limits.max)).any(axis=1)
    else:
        return None
    bad = np.flatnonzero(nan | inf | too_big)
    if not bad.size:
        return None
    index = int(bad[0])
    found = [word for word, flags in (("NaN", nan), ("Inf", inf)) if flags[index]]
    if found:
        return index, "contains " + " and ".join(found)
    return index, f"has values beyond the {model_dtype} range"


# --------------------------------------------------------------------------------------------
def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names) or "(none)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return text or type(error).__name__
