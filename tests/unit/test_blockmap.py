"""BlockMap's run iterators against a plain list of its entries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virtua.storage.blockmap import BlockMap

# entries as a sequential import lays them out (v, v+1, ...), with holes, zeros and repeats
_piece = st.tuples(st.sampled_from(["linear", "hole", "zero", "same", "random"]), st.integers(1, 40))


def _entries(pieces: list[tuple[str, int]], start: int) -> list[int]:
    out: list[int] = []
    nxt = start
    for kind, n in pieces:
        if kind == "linear":
            out += range(nxt, nxt + n)
            nxt += n + 3
        elif kind == "random":
            out += [(nxt * 7 + i * 13) % 997 + 1 for i in range(n)]
        else:
            out += [{"hole": 0, "zero": -1, "same": 5}[kind]] * n
    return out


@given(st.lists(_piece, max_size=12), st.integers(1, 50), st.integers(0, 20), st.integers(0, 20), st.booleans())
def test_linear_runs_expand_to_the_map(pieces: list[tuple[str, int]], start: int, lo: int, cut: int,
                                       forked: bool) -> None:
    entries = _entries(pieces, start)
    m = BlockMap()
    for c, v in enumerate(entries):
        m.set(c, v)
    if forked:  # a clone's map reads the same
        m = m.fork()
    last = max(lo, len(entries) - cut + 7)  # past the end too: holes
    got: list[int] = []
    for s, n, v in m.linear_runs(lo, last):
        assert s == lo + len(got) and n > 0
        got += range(v, v + n) if v > 0 else [v] * n
    want = [entries[c] if c < len(entries) else 0 for c in range(lo, last)]
    assert got == want
    # and runs() covers the same, each run one value
    flat = [v for _s, n, v in m.runs(lo, last) for v in [v] * n]
    assert flat == want


def test_a_sequential_layout_is_one_run_per_segment_or_less() -> None:
    m = BlockMap()
    for c in range(1000):
        m.set(c, 100 + c)
    runs = list(m.linear_runs(0, 1000))
    assert len(runs) <= 1000 // 16 + 2
    assert runs[0] == (0, 16, 100) and sum(n for _s, n, _v in runs) == 1000
