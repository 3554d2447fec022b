"""Calibration sources: the columns of a data set and reading it in batches (in-memory arrays here;
Parquet in :mod:`fp8core.calibration.parquet`), the error type and shared helpers."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

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


class EvenlySpaced(CalibrationSource):
    """``count`` samples of ``source`` spread evenly over it (samples ``i * N // count``), in order.

    A subset that still sees the whole data set: files are often ordered (by class, by recording),
    and the first ``count`` samples would see one end of it. Read through ``source``'s own batches."""

    def __init__(self, source: CalibrationSource, count: int):
        n = source.num_samples
        self.source = source
        self.indices = np.arange(count, dtype=np.int64) * n // count if 0 < count < n else np.arange(n)
        super().__init__(source.path, [source.column_info(c) for c in source.columns], len(self.indices))

    def _files(self) -> list[Path]:
        return self.source._files()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            key = f"{self.source.fingerprint()} evenly spaced {self.num_samples} of {self.source.num_samples}"
            self._fingerprint = hashlib.sha256(key.encode()).hexdigest()
        return self._fingerprint

    def _iter_chunks(self, names: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        if not names:
            return
        start = 0
        for chunk in self.source.iter_batches(batch_size, names):
            rows = len(chunk[names[0]])
            first, end = np.searchsorted(self.indices, [start, start + rows])  # the indices are sorted
            keep = self.indices[first:end] - start
            start += rows
            if len(keep):
                yield {name: chunk[name][keep] for name in names}


def evenly_spaced(source: CalibrationSource, count: int) -> CalibrationSource:
    """At most ``count`` samples of ``source`` (:class:`EvenlySpaced`); ``source`` itself if it has no more."""
    return source if source.num_samples <= count else EvenlySpaced(source, count)


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


# --- in-memory arrays ----------------------------------------------------------------------
def _array_column_info(name: str, array: np.ndarray) -> ColumnInfo:
    if array.ndim == 0:
        return ColumnInfo(name, None, None, "is a single value with no sample axis")
    if not _is_tensor(array.dtype):
        return ColumnInfo(name, None, None, f"holds {array.dtype} values{_TENSORS_ONLY}")
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
_TENSORS_ONLY = "; only bool, integer, float and str (for a model's string inputs) tensors are supported"


def _is_tensor(dtype: np.dtype) -> bool:
    """Arrays fed as they are: numbers, and unicode text for ONNX string inputs (scikit-learn text
    pipelines exported by skl2onnx take ``StringTensorType``)."""
    return dtype.kind in "biufU"


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
def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names) or "(none)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return text or type(error).__name__
