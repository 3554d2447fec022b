"""Register and serve the project's two deployments with one command::

    python -m deployments.serve            # needs PREFECT_API_URL pointing at a Prefect server

* ``fp8-convert/fp8-convert-on-demand``: the conversion flow; its parameter form is drawn from
  :class:`flows.params.ConvertParams` (types, descriptions, enum choices, defaults).
* ``fp8-requantize-nightly/fp8-requantize-nightly``: re-quantizes the models in
  ``deployments/models.yaml`` on a cron schedule (default 02:00 every day), skipping unchanged ones.

``serve`` both registers the deployments and runs their flow runs in subprocesses of this
process, until it is stopped (Ctrl-C / SIGTERM); no work pool or worker is needed.
"""

from __future__ import annotations

import argparse
import sys

from prefect.deployments.runner import EntrypointType

NIGHTLY_CRON = "0 2 * * *"
ON_DEMAND = "fp8-convert-on-demand"
NIGHTLY = "fp8-requantize-nightly"


def build_deployments(config_path: str | None = None, cron: str = NIGHTLY_CRON, timezone: str = "UTC"):
    """The two RunnerDeployments (not yet registered)."""
    from prefect.schedules import Cron

    from flows.convert import fp8_convert
    from flows.requantize import DEFAULT_CONFIG, fp8_requantize_nightly

    # module entrypoints: runs load the flows from the installed package, whatever the working dir
    on_demand = fp8_convert.to_deployment(
        name=ON_DEMAND, entrypoint_type=EntrypointType.MODULE_PATH, tags=["fp8"],
        description="Convert one ONNX model to FP8 (fill in params; quantize=true needs data_preprocess).")
    nightly = fp8_requantize_nightly.to_deployment(
        name=NIGHTLY, entrypoint_type=EntrypointType.MODULE_PATH, tags=["fp8", "nightly"],
        schedule=Cron(cron, timezone=timezone), parameters={"config_path": config_path or DEFAULT_CONFIG},
        description="Re-quantize the watched models whose model or newest calibration data changed.")
    return [on_demand, nightly]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="re-quantization config (default: deployments/models.yaml)")
    p.add_argument("--cron", default=NIGHTLY_CRON, help=f"nightly schedule (default {NIGHTLY_CRON!r})")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = p.parse_args(argv)
    from prefect import serve

    serve(*build_deployments(args.config, args.cron, args.timezone), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
