"""Opening a calibration data set by its path: the format is chosen by the suffix."""

from __future__ import annotations

import os
from pathlib import Path

from fp8core.calibration.npz import _load_npz
from fp8core.calibration.parquet import ParquetSource, _parquet_files_in
from fp8core.calibration.safe_pickle import _load_pickle
from fp8core.calibration.source import (
    ArraySource, CalibrationDataError, CalibrationSource, NPZ_SUFFIXES, PARQUET_SUFFIXES,
    PICKLE_SUFFIXES,
)


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
