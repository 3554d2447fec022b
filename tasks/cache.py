"""Tasks: look up and store captured calibration statistics in the on-disk cache (fp8core.cache)."""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.cache import CacheEntryCorrupt, StatsCache, StatsKey
from fp8core.stats import TensorStats

HIT, MISS, CORRUPT = "hit", "miss", "corrupt"


@task(name="load-cached-statistics", cache_policy=NONE)
def load_cached_stats(root: str, key: StatsKey) -> tuple[dict[str, TensorStats] | None, str]:
    """(statistics, "hit") or (None, "miss"); a damaged entry is logged, deleted, and reported "corrupt"."""
    cache = StatsCache(root)
    try:
        stats = cache.load(key)
    except CacheEntryCorrupt as exc:
        message = f"calibration statistics cache entry {cache.path(key)} is corrupt ({exc}); recomputing"
        get_run_logger().warning(message)
        logging.getLogger("fp8").warning(message)
        cache.discard(key)
        return None, CORRUPT
    except OSError as exc:  # unreadable cache dir: run without the cache rather than fail
        get_run_logger().warning("statistics cache unreadable (%s); capturing", exc)
        return None, MISS
    return (stats, HIT) if stats is not None else (None, MISS)


@task(name="store-statistics", cache_policy=NONE)
def store_stats(root: str, key: StatsKey, stats: dict[str, TensorStats]) -> str | None:
    """Write the entry; a cache that cannot be written only costs the next run a capture."""
    try:
        return str(StatsCache(root).store(key, stats))
    except OSError as exc:
        get_run_logger().warning("could not write the statistics cache (%s)", exc)
        return None
