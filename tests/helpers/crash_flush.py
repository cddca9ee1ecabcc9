"""Does one client's FLUSH stall the others? fio reads 4 KiB at random (queue depth 1)
from one export while another client writes a large dirty set to another export of the
same pool and flushes it, over and over; fio logs every read's latency with a unix
timestamp (--write_lat_log, --log_unix_epoch), the writer logs each FLUSH's window, and
the reads that completed inside a window are compared with an idle run.

Used by tests/unit/test_storage_flush.py and `./run bench crash`.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from virtua.nbd.client import NBDClient

MIB = 1 << 20


@dataclass
class FlushIsolation:
    idle_p50_us: float
    idle_p99_us: float
    flush_p50_us: float
    flush_p99_us: float
    flush_reads: int
    flushes: int
    flush_ms: float  # median FLUSH duration seen by the writer
    dirty_bytes: int
    busy_p99_us: float = 0.0  # every read of the busy run: while writing and flushing


def _read_lat_log(prefix: Path) -> list[tuple[float, float]]:
    """(completion time in s since the epoch, latency in us) of every logged read."""
    out = []
    for line in Path(f"{prefix}_lat.1.log").read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 3 and fields[2] == "0":  # direction 0: read
            out.append((int(fields[0]) / 1000.0, int(fields[1]) / 1000.0))
    return out


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100.0 * len(s)))]


def _fio(uri: str, prefix: Path, seconds: float, size: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["fio", "--name=reader", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         "--iodepth=1", f"--size={size}", "--time_based", f"--runtime={seconds}",
         f"--write_lat_log={prefix}", "--log_avg_msec=0", "--log_unix_epoch=1",
         "--output-format=terse"],
        cwd=prefix.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def measure(port: int, read_export: str, write_export: str, workdir: Path, *,
            dirty_bytes: int = 64 * MIB, seconds: float = 3.0, read_size: int = 32 * MIB) -> FlushIsolation:
    uri = f"nbd://127.0.0.1:{port}/{read_export}"
    filler = NBDClient.connect(port=port).open(read_export)
    block = b"r" * MIB
    for off in range(0, read_size, MIB):  # reads hit data, not holes
        filler.write(off, block)
    filler.flush()
    filler.disconnect()

    idle = _fio(uri, workdir / "idle", seconds, read_size)
    _, err = idle.communicate(timeout=seconds + 60)
    assert idle.returncode == 0, err.decode()
    idle_lat = [lat for _, lat in _read_lat_log(workdir / "idle")]

    windows: list[tuple[float, float]] = []
    writer = NBDClient.connect(port=port).open(write_export)
    dirty = b"w" * MIB
    stop = threading.Event()

    def write_and_flush() -> None:
        span = writer.size // dirty_bytes
        n = 0
        while not stop.is_set():
            base = (n % max(span, 1)) * dirty_bytes
            for off in range(0, dirty_bytes, MIB):
                writer.write(base + off, dirty)
            t0 = time.time()
            writer.flush()
            windows.append((t0, time.time()))
            n += 1

    busy = _fio(uri, workdir / "busy", seconds, read_size)
    time.sleep(0.3)  # fio's start-up
    t = threading.Thread(target=write_and_flush)
    t.start()
    _, err = busy.communicate(timeout=seconds + 60)
    stop.set()
    t.join(60)
    writer.disconnect()
    assert busy.returncode == 0, err.decode()
    busy_lat = _read_lat_log(workdir / "busy")
    # A read is "during" a FLUSH when it was issued while the FLUSH was in flight: a read
    # the FLUSH stalls counts however late it completes, and neither a read queued behind
    # the writer's last 1 MiB write before it nor one behind the next write after it does
    # (those are the writes' cost, measured by busy_p99). fio stamps completions in whole
    # ms, truncated: done - latency is at most the true issue time, so ">= a" never lets
    # in a read issued before the FLUSH.
    during = [
        lat for done, lat in busy_lat
        if any(a <= done - lat / 1e6 <= b for a, b in windows)
    ]
    flush_ms = sorted((b - a) * 1000 for a, b in windows)
    return FlushIsolation(
        idle_p50_us=_pct(idle_lat, 50), idle_p99_us=_pct(idle_lat, 99),
        flush_p50_us=_pct(during, 50), flush_p99_us=_pct(during, 99),
        flush_reads=len(during), flushes=len(windows),
        flush_ms=flush_ms[len(flush_ms) // 2] if flush_ms else 0.0, dirty_bytes=dirty_bytes,
        busy_p99_us=_pct([lat for _, lat in busy_lat], 99),
    )
