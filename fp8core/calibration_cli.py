"""``fp8-data``: convert calibration data to Parquet and describe a data set.

    fp8-data to-parquet SRC DST [--row-group-size ROWS]   .npz/.pkl/Parquet -> one Parquet file
    fp8-data info PATH                                    columns, shapes, dtypes, fingerprint

Pickles are read through the same array-only loader as everywhere else (nothing in them runs).
A problem with the data prints one line on stderr and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from fp8core.calibration import CalibrationDataError, CalibrationSource, open_dataset, write_parquet

PROGRAM = "fp8-data"
USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CalibrationDataError, OSError) as error:
        print(f"{PROGRAM}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "to-parquet", help="write a calibration data set (.npz, .pkl, Parquet) as one Parquet file"
    )
    convert.add_argument("src", help="calibration data: .npz, .pkl, .parquet or a directory")
    convert.add_argument("dst", help="Parquet file to write (replaced atomically)")
    convert.add_argument(
        "--row-group-size", type=int, default=None, help="rows per row group (default: ~64 MiB)"
    )
    convert.set_defaults(run=_to_parquet)

    info = commands.add_parser("info", help="print a data set's columns, samples and fingerprint")
    info.add_argument("path", help="calibration data: .npz, .pkl, .parquet or a directory")
    info.set_defaults(run=_info)
    return parser


def _to_parquet(args: argparse.Namespace) -> None:
    source = open_dataset(args.src)
    readable = [name for name in source.columns if source.column_info(name).readable]
    if not readable:
        raise CalibrationDataError(f"calibration data {source.path} has no tensor column to write")
    # Calibration sets are small (tens to hundreds of samples): gathered in memory, written once.
    batches = list(source.iter_batches(max(source.num_samples, 1), names=readable))
    arrays = batches[0] if batches else _empty_arrays(source, readable)
    write_parquet(arrays, args.dst, row_group_size=args.row_group_size)
    print(f"wrote {source.num_samples} samples, columns {', '.join(readable)} to {args.dst}")


def _empty_arrays(source: CalibrationSource, names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.empty((0, *source.sample_shape(name)), source.dtype(name)) for name in names}


def _info(args: argparse.Namespace) -> None:
    source = open_dataset(args.path)
    print(f"path: {source.path}")
    print(f"samples: {source.num_samples}")
    print(f"fingerprint: sha256:{source.fingerprint()}")
    print("columns:")
    width = max((len(name) for name in source.columns), default=0)
    for name in source.columns:
        column = source.column_info(name)
        if column.readable:
            print(f"  {name:<{width}}  {str(column.dtype):<8}  {column.sample_shape}")
        else:
            print(f"  {name:<{width}}  not a tensor column: {column.problem}")


if __name__ == "__main__":
    sys.exit(main())
