"""A writer under load for the crash tests: `python -m tests.helpers.crash_writer POOL VOL SEED LOG`.

Round r applies ops(seed, r) to the volume, flushes, and only then logs "r" (fsync'd);
every 5th round also takes snapshot "r<r>" and logs "s <r>", and deletes the one from
ten rounds before (logging "d <r>" first). The parent kills it with
SIGKILL at a random moment and checks that everything logged is there.
"""

from __future__ import annotations

import os
import random
import sys

BLOCK = 4096


def ops(seed: int, rnd: int, blocks: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed * 1_000_003 + rnd)
    out = []
    for _ in range(24):
        start = rng.randrange(blocks)
        count = min(rng.randint(1, 40), blocks - start)
        out.append(("zero" if rng.random() < 0.15 else "write", start, count))
    return out


def payload(rnd: int, start: int, count: int) -> bytes:
    return b"".join(
        (f"r{rnd:06d}b{b:08d}".encode() * (BLOCK // 16))[:BLOCK] for b in range(start, start + count)
    )


def main() -> None:
    from virtua.storage.pool import Pool
    from virtua.storage.volume import VolumeDevice

    path, vol, seed, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    pool = Pool(path)
    dev = VolumeDevice(pool, pool.volume(vol))
    blocks = dev.size // BLOCK
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rnd = 0
    while True:
        rnd += 1
        for kind, start, count in ops(seed, rnd, blocks):
            if kind == "write":
                dev.write(start * BLOCK, payload(rnd, start, count))
            else:
                dev.write_zeroes(start * BLOCK, count * BLOCK)
        if rnd % 5 == 0:
            pool.create_snapshot(vol, f"r{rnd}")  # flushes first
            os.write(logfd, f"s {rnd}\n".encode())
            if rnd > 10:  # keep two: deleting merges layers and frees chunks under load
                os.write(logfd, f"d {rnd - 10}\n".encode())
                pool.delete_snapshot(vol, f"r{rnd - 10}")
        dev.flush()
        os.write(logfd, f"{rnd}\n".encode())
        os.fsync(logfd)


if __name__ == "__main__":
    main()
