"""PopRT's pickled calibration data, read by an unpickler that resolves only the numpy globals a
plain array needs: any other global is refused before anything runs."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fp8core.calibration.source import CalibrationDataError, _damaged


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
