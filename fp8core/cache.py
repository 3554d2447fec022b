"""A disk cache of captured calibration statistics, keyed by everything that determines them.

Key: sha256 over a canonical JSON of (cache format version, TensorStats format version, model
sha256, calibration data fingerprint, sorted captured tensor names, batch size). The batch size
is part of the key because the streaming statistics fold batches in order: another batching
gives the same values up to float rounding, not the same bytes, and a cached run must give the
same FP8 model bytes as an uncached one. Loss, formats and fallback settings are not in the key:
changing them re-uses the capture.

Entry file ``<root>/<key[:2]>/<key>.fp8stats``::

    MAGIC (8 bytes) | sha256(payload) (32 bytes) | payload
    payload = header length (8 bytes, little endian) | header JSON | stats blobs, concatenated
    header  = {"key": {...the key fields...}, "tensors": [[name, byte length], ...]}

An entry is written to a temp file in the same directory and renamed into place (readers see a
whole entry or none, concurrent writers of the same key both write the same bytes). On read the
checksum, the header and the key fields are verified; any mismatch raises
:class:`CacheEntryCorrupt` and the caller recomputes - a damaged entry is never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from fp8core.stats import FORMAT_VERSION as STATS_FORMAT_VERSION
from fp8core.stats import StatsFormatError, TensorStats

MAGIC = b"FP8STAT1"
CACHE_FORMAT_VERSION = 1
_DIGEST_BYTES = 32


class CacheEntryCorrupt(Exception):
    """A cache entry failed its checksum or does not match its key; it must be recomputed."""


def default_cache_dir() -> str:
    """``$FP8_CACHE_DIR``, else ``$XDG_CACHE_HOME/fp8-pipeline``, else ``~/.cache/fp8-pipeline``."""
    explicit = os.environ.get("FP8_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fp8-pipeline")


@dataclasses.dataclass(frozen=True)
class StatsKey:
    """What captured statistics depend on."""

    model_sha256: str
    data_fingerprint: str
    tensors: tuple[str, ...]  # sorted
    batch_size: int

    @classmethod
    def of(cls, model_sha256: str, data_fingerprint: str, tensors, batch_size: int) -> "StatsKey":
        return cls(model_sha256, data_fingerprint, tuple(sorted(set(tensors))), int(batch_size))

    def fields(self) -> dict:
        return {"cache_format": CACHE_FORMAT_VERSION, "stats_format": STATS_FORMAT_VERSION,
                "model_sha256": self.model_sha256, "data_fingerprint": self.data_fingerprint,
                "tensors": list(self.tensors), "batch_size": self.batch_size}

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def encode_entry(key: StatsKey, stats: dict[str, TensorStats]) -> bytes:
    """The bytes of one entry (see the module docstring for the layout)."""
    names = sorted(stats)
    blobs = [stats[n].to_bytes() for n in names]
    header = json.dumps({"key": key.fields(), "tensors": [[n, len(b)] for n, b in zip(names, blobs)]},
                        sort_keys=True).encode()
    payload = len(header).to_bytes(8, "little") + header + b"".join(blobs)
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode_entry(data: bytes, key: StatsKey) -> dict[str, TensorStats]:
    """Statistics from an entry's bytes; raises :class:`CacheEntryCorrupt` on any mismatch."""
    head = len(MAGIC) + _DIGEST_BYTES
    if len(data) < head + 8 or data[:len(MAGIC)] != MAGIC:
        raise CacheEntryCorrupt("not a statistics cache entry (bad magic or truncated)")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        raise CacheEntryCorrupt("checksum mismatch: the entry was damaged after it was written")
    size = int.from_bytes(payload[:8], "little")
    try:
        header = json.loads(payload[8:8 + size])
    except ValueError as exc:
        raise CacheEntryCorrupt(f"unreadable header: {exc}") from None
    if header.get("key") != key.fields():
        raise CacheEntryCorrupt("entry was written for another key")
    names = [n for n, _ in header["tensors"]]
    if sorted(names) != list(key.tensors):
        raise CacheEntryCorrupt("entry holds other tensors than its key names")
    out: dict[str, TensorStats] = {}
    offset = 8 + size
    for name, length in header["tensors"]:
        blob = payload[offset:offset + length]
        if len(blob) != length:
            raise CacheEntryCorrupt("entry is shorter than its header says")
        try:
            out[name] = TensorStats.from_bytes(blob)
        except (StatsFormatError, ValueError, KeyError, OSError) as exc:
            raise CacheEntryCorrupt(f"statistics of {name!r} unreadable: {exc}") from None
        offset += length
    if offset != len(payload):
        raise CacheEntryCorrupt("entry has trailing bytes")
    return out


class StatsCache:
    """Captured statistics on disk under ``root``; one file per :class:`StatsKey`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: StatsKey) -> Path:
        d = key.digest
        return self.root / d[:2] / f"{d}.fp8stats"

    def load(self, key: StatsKey) -> dict[str, TensorStats] | None:
        """The cached statistics, or None when there is no entry; CacheEntryCorrupt when damaged."""
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        return decode_entry(data, key)

    def store(self, key: StatsKey, stats: dict[str, TensorStats]) -> Path:
        """Write the entry atomically (temp file in the same directory, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_entry(key, stats))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path

    def discard(self, key: StatsKey) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
