"""The paged adapter pool and the contiguous baseline allocator."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuworker.engine import ContiguousAllocator, PagedAdapterPool, PoolFullError

pytestmark = pytest.mark.unit

PAGE = 16
ops = st.lists(
    st.tuples(st.sampled_from(["load", "release", "pin", "unpin"]), st.integers(0, 11), st.integers(1, 200)),
    max_size=80,
)


def _check_invariants(pool: PagedAdapterPool) -> None:
    pages = [p for e in pool.entries() for p in e.pages]
    assert len(pages) == len(set(pages)), "two adapters share a page"
    free = pool.allocator._free
    assert sorted(pages + free) == list(range(pool.num_pages)), "a page leaked or was double-freed"
    stats = pool.stats()
    live = sum(e.numel for e in pool.entries()) * 4
    assert stats.pages_used == len(pages) and stats.pages_free == len(free)
    assert stats.live_bytes == live
    assert stats.utilisation == pytest.approx(live / (pool.num_pages * PAGE * 4))
    for e in pool.entries():
        assert len(e.pages) == -(-e.numel // PAGE)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_paged_pool_random_churn_keeps_pages_disjoint_and_data_intact(sequence) -> None:
    pool = PagedAdapterPool(num_pages=40, page_elems=PAGE, dtype=torch.float32, device="cpu")
    written: dict[str, torch.Tensor] = {}
    for op, key, size in sequence:
        name = f"a{key}"
        if op == "load" and name not in pool:
            data = torch.arange(size, dtype=torch.float32) + key * 1000
            try:
                entry, evicted = pool.load(name, size)
            except PoolFullError:
                continue
            for victim in evicted:
                assert pool.stats() and victim not in pool
                written.pop(victim)
            pool.write(entry, data)
            written[name] = data
        elif op == "release" and name in pool and pool.entry(name).pins == 0:
            pool.release(name)
            written.pop(name)
        elif op == "pin" and name in pool:
            pool.pin(name)
        elif op == "unpin" and name in pool:
            pool.unpin(name)
        _check_invariants(pool)
    for name, data in written.items():
        assert torch.equal(pool.read(pool.entry(name)), data), "an adapter's pages were overwritten"


def test_lru_evicts_coldest_unpinned_first() -> None:
    pool = PagedAdapterPool(num_pages=6, page_elems=PAGE, dtype=torch.float32, device="cpu")
    for name in ("a", "b", "c"):
        pool.load(name, 2 * PAGE)
    pool.pin("a")
    pool.touch("b")  # order now: a (pinned), c, b
    assert pool.lru() == ["c", "b"]
    _, evicted = pool.load("d", 2 * PAGE)
    assert evicted == ["c"]
    with pytest.raises(PoolFullError):
        pool.load("e", 5 * PAGE)  # only b (2 pages) is evictable
    assert "b" in pool, "a failed load must evict nothing"
    with pytest.raises(ValueError):
        pool.release("a")  # pinned


def test_mixed_rank_utilisation_is_high() -> None:
    """Pages sized to one rank unit: mixed ranks 8..128 waste under 5% of the bytes they take."""
    pool = PagedAdapterPool(num_pages=4000, page_elems=8 * 2 * 512, dtype=torch.float32, device="meta")
    per_rank_unit = 8 * (512 + 512) * 2 * 8  # q,v of 8 layers
    for i, rank in enumerate([8, 16, 32, 64, 128] * 6):
        pool.load(f"a{i}", rank // 8 * per_rank_unit)
    stats = pool.stats()
    assert stats.live_bytes / (stats.pages_used * stats.page_bytes) >= 0.95


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(1, 300)), max_size=80))
def test_contiguous_allocator_has_no_overlap_or_leak(sequence) -> None:
    alloc = ContiguousAllocator(capacity=1000)
    for is_load, key, size in sequence:
        name = f"a{key}"
        if is_load and name not in alloc:
            alloc.load(name, size)
        elif not is_load and name in alloc:
            alloc.release(name)
        spans = sorted(alloc.ranges().values())
        for (o1, s1), (o2, _) in itertools.pairwise(spans):
            assert o1 + s1 <= o2
        assert all(o >= 0 and o + s <= 1000 for o, s in spans)
        assert alloc.live_units() + sum(h[1] for h in alloc._holes) == 1000
        assert alloc.utilisation() == pytest.approx(alloc.live_units() / 1000)
