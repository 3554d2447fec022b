"""Run outputs that appear together or not at all.

Logs of a run (quantize.log, precision_compare.json, charts...) are written into a hidden staging
folder beside their destination and moved into place only when the run succeeds; a failed or
killed run leaves the previous outputs as they were and no partial new ones; the staging folder
of a killed run (its writer process gone) is removed by the next run into the same destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from fp8core.modelio import remove_stale_temps, temp_prefix

STAGING = "fp8-staging"


class StagedOutputs:
    def __init__(self, destination: str):
        self.destination = os.path.abspath(destination)
        os.makedirs(self.destination, exist_ok=True)
        remove_stale_temps(self.destination, STAGING)
        self.path = tempfile.mkdtemp(prefix=temp_prefix(STAGING), suffix=".tmp", dir=self.destination)

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> dict[str, str]:
        """Move every staged file into the destination (each move atomic); returns staged -> final."""
        moved = {}
        for name in sorted(os.listdir(self.path)):
            staged, final = os.path.join(self.path, name), os.path.join(self.destination, name)
            os.replace(staged, final)
            moved[staged] = final
        self.discard()
        return moved

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def final_path(self, value):
        """``value`` with staged paths replaced by their final paths (strings, dicts, lists)."""
        if isinstance(value, str) and value.startswith(self.path + os.sep):
            return os.path.join(self.destination, os.path.relpath(value, self.path))
        if isinstance(value, dict):
            return {k: self.final_path(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.final_path(v) for v in value]
        return value
