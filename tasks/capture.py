"""Task: capture FP8 op inputs on one shard of the calibration data into streaming statistics."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.capture import capture_stats
from fp8core.report import ProgressLine


@task(name="capture-activations", cache_policy=NONE, **IO_RETRIES)
def capture_activations(model, tensors: list[str], source, batch_size: int, shard=None, show_progress: bool = False,
                        also=()):
    """``also``: accumulators fed by the same pass (fp8core.capture.capture_stats)."""
    log = get_run_logger()
    line = ProgressLine("capture", enabled=show_progress)

    def progress(done, total):
        line.update(done, total)
        log.debug("capture: batch %d/%d", done, total)

    stats = capture_stats(model, tensors, source, batch_size, progress, shard, also)
    line.close()
    return stats
