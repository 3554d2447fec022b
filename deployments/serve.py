"""Register and serve the project's two deployments with one command::

    python -m deployments.serve            # needs PREFECT_API_URL pointing at a Prefect server

* ``fp8-convert/fp8-convert-on-demand``: the conversion flow; its parameter form is drawn from
  :class:`tasks.params.ConvertParams` (types, descriptions, enum choices, defaults).
* ``fp8-requantize-nightly/fp8-requantize-nightly``: re-quantizes the models in
  ``deployments/models.yaml`` on a cron schedule (default 02:00 every day), skipping unchanged ones.

``serve`` both registers the deployments and runs their flow runs in subprocesses of this
process, until it is stopped (Ctrl-C / SIGTERM); no work pool or worker is needed. Stopping it
cancels its running flow runs and pauses both deployments (their schedules stop until the next
``serve``); if the Prefect server cannot be reached to pause them, it exits anyway after
``STOP_GRACE_SECONDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from prefect.deployments.runner import EntrypointType

NIGHTLY_CRON = "0 2 * * *"
# Prefect's runner pauses the deployments through the API on the way out and retries without
# end when the server has gone; schedulers, containers and systemd wait for no one
STOP_GRACE_SECONDS = 8.0
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
    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *a, **kw):
            _exit_soon(143, "SIGTERM")
            super().handle_sigterm(*a, **kw)

    def on_sigint(signum, frame):
        _exit_soon(130, "Ctrl-C")
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    runner = _Runner(pause_on_shutdown=True, limit=args.limit)
    for deployment in build_deployments(args.config, args.cron, args.timezone):
        runner.add_deployment(deployment)
    print(f"Serving {ON_DEMAND} and {NIGHTLY} (Ctrl-C or SIGTERM stops and pauses them)", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
    return 0


def _exit_soon(code: int, why: str) -> None:
    """Give the graceful stop STOP_GRACE_SECONDS, then leave whatever it is waiting for."""
    def leave():
        print(f"deployments.serve: {why}: not stopped within {STOP_GRACE_SECONDS:.0f} s (Prefect server "
              "unreachable?); exiting now, the deployments may not be paused", file=sys.stderr, flush=True)
        os._exit(code)

    timer = threading.Timer(STOP_GRACE_SECONDS, leave)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
