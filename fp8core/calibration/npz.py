"""``.npz`` calibration data, loaded with ``allow_pickle=False`` after checking each member's header."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from fp8core.calibration.source import CalibrationDataError, _damaged, _refuse_if_too_big


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
