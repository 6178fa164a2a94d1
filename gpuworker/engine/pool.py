"""Paged adapter memory: one preallocated device tensor cut into fixed-size pages.

An adapter's weights are packed into one flat vector (see ``adapter_weights``) and
stored in ``ceil(numel / page_elems)`` pages taken from a free list, in any order.
Pages need not be contiguous, so a pool never fragments: any free page serves any
adapter, and the only waste is the tail of each adapter's last page. The engine sizes a
page as one rank unit (8 ranks) of one square (layer, module) pair, so an adapter of rank
r takes pages in proportion to r and the tail is under one page out of tens or hundreds.

``ContiguousAllocator`` is the baseline the benchmark compares against: first-fit over one
buffer, where holes between live adapters fragment free memory under churn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch


class PoolFullError(RuntimeError):
    """The pool cannot hold an adapter even after evicting every unpinned one."""

    def __init__(self, message: str, *, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the page pool. ``utilisation`` = live adapter bytes / pool bytes."""

    pages_total: int
    pages_used: int
    pages_free: int
    page_bytes: int
    live_bytes: int
    utilisation: float
    adapters: int = 0


class PageAllocator:
    """A LIFO free list of page ids: O(1) per page to allocate and to free."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError("a pool needs at least one page")
        self.num_pages = num_pages
        # Reversed so that the first allocations take pages 0, 1, 2, ... (easier to read in a debugger).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` pages; raises PoolFullError (and takes nothing) if fewer are free."""
        if n > len(self._free):
            raise PoolFullError(f"need {n} pages, {len(self._free)} free", needed=n, available=len(self._free))
        # The free list's tail, reversed: ascending page ids, so an adapter usually gets one run
        # of consecutive pages (which the pool reads back as a view, without a gather).
        pages = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))  # the next alloc of as many pages takes this run back, ascending


@dataclass
class PoolEntry:
    """One resident adapter: its pages, its live size and its pin count."""

    adapter_id: str
    pages: list[int]
    page_index: torch.Tensor  # the same page ids as a device tensor, for one-op gathers
    numel: int
    pins: int = 0
    meta: Any = None  # what the caller needs to read the weights back (layout, rank, scaling)
    ready: bool = True  # False while a reserved entry's weights are still being copied in


class PagedAdapterPool:
    """The device page tensor and the one owner of which adapter holds which pages.

    Keeps adapters in LRU order (coldest first); pinned adapters (used by a running or
    waiting request) are never evicted. ``load`` evicts before it loads.
    """

    def __init__(self, num_pages: int, page_elems: int, dtype: torch.dtype, device: str | torch.device) -> None:
        self.allocator = PageAllocator(num_pages)
        self.page_elems = page_elems
        self.dtype = dtype
        # The one preallocated tensor; a "meta" device gives the pure-logic pool the benchmark simulates.
        self.data = torch.zeros(num_pages, page_elems, dtype=dtype, device=device)
        self._entries: OrderedDict[str, PoolEntry] = OrderedDict()
        self._elem_bytes = torch.empty(0, dtype=dtype).element_size()

    # -- sizing -----------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self._elem_bytes

    def pages_needed(self, numel: int) -> int:
        return max(1, -(-numel // self.page_elems))

    # -- residency --------------------------------------------------------------------------
    def __contains__(self, adapter_id: str) -> bool:
        """Resident and usable (a reserved entry still being copied in is not)."""
        entry = self._entries.get(adapter_id)
        return entry is not None and entry.ready

    def holds(self, adapter_id: str) -> bool:
        """Has pages for ``adapter_id``, usable or still being copied in."""
        return adapter_id in self._entries

    def entry(self, adapter_id: str) -> PoolEntry:
        return self._entries[adapter_id]

    def entries(self) -> list[PoolEntry]:
        """The usable entries, coldest first."""
        return [e for e in self._entries.values() if e.ready]

    def plan_eviction(self, pages: int) -> list[str]:
        """The coldest unpinned adapters whose pages make ``pages`` free; PoolFullError if none can."""
        free = self.allocator.num_free
        victims: list[str] = []
        for entry in self._entries.values():
            if free >= pages:
                break
            if entry.pins == 0:
                victims.append(entry.adapter_id)
                free += len(entry.pages)
        if free < pages:
            raise PoolFullError(
                f"adapter needs {pages} pages; {free} free even after evicting every unpinned adapter",
                needed=pages,
                available=free,
            )
        return victims

    def load(self, adapter_id: str, numel: int, meta: Any = None) -> tuple[PoolEntry, list[str]]:
        """Allocate pages for ``adapter_id``, evicting LRU unpinned adapters first.

        Returns the new entry and the ids evicted for it. Nothing changes on PoolFullError.
        """
        if adapter_id in self._entries:
            raise ValueError(f"adapter {adapter_id!r} is already resident or being loaded")
        victims = self.plan_eviction(self.pages_needed(numel))
        for victim in victims:
            self.release(victim)
        pages = self.allocator.alloc(self.pages_needed(numel))
        index = torch.tensor(pages, dtype=torch.long, device=self.data.device)
        entry = PoolEntry(adapter_id, pages, index, numel, meta=meta)
        self._entries[adapter_id] = entry
        return entry, victims

    def reserve(self, adapter_id: str, numel: int, meta: Any = None) -> tuple[PoolEntry, list[str]]:
        """Like ``load``, but the entry is not usable until ``commit``: its pages can be written from
        another thread (or a side stream) while steps read the other pages. A reserved entry is
        pinned, so no other load evicts it half-written; ``release_reserved`` gives it back."""
        entry, victims = self.load(adapter_id, numel, meta)
        entry.ready = False
        entry.pins = 1
        return entry, victims

    def commit(self, adapter_id: str) -> None:
        """A reserved entry's weights are in place: make it usable (most recently used)."""
        entry = self._entries[adapter_id]
        if not entry.ready:
            entry.ready = True
            entry.pins -= 1
            self.touch(adapter_id)

    def release_reserved(self, adapter_id: str) -> None:
        """Give back a reserved entry whose copy failed."""
        entry = self._entries.get(adapter_id)
        if entry is not None and not entry.ready:
            entry.pins = 0
            self.release(adapter_id)

    def release(self, adapter_id: str) -> None:
        """Return an unpinned adapter's pages to the free list."""
        entry = self._entries[adapter_id]
        if entry.pins:
            raise ValueError(f"adapter {adapter_id!r} is in use by {entry.pins} request(s)")
        del self._entries[adapter_id]
        self.allocator.free(entry.pages)

    # -- data -------------------------------------------------------------------------------
    def write(self, entry: PoolEntry, flat: torch.Tensor) -> None:
        """Copy a flat host vector into the entry's pages (full pages in one op, then the tail).

        Safe to call from another thread (or CUDA stream) than the one stepping: it writes only the
        entry's own pages, which no step reads before the entry is committed."""
        flat = flat.to(device=self.data.device, dtype=self.dtype, non_blocking=True)
        full = entry.numel // self.page_elems
        if full:
            self.data[entry.page_index[:full]] = flat[: full * self.page_elems].view(full, self.page_elems)
        tail = entry.numel - full * self.page_elems
        if tail:
            self.data[entry.pages[full], :tail] = flat[full * self.page_elems :]

    def read(self, entry: PoolEntry) -> torch.Tensor:
        """The adapter's flat vector: a view of the pool when its pages are one ascending run, else
        gathered from its pages (a copy). Read once per batch composition that brings it in; a view
        is only valid while the adapter is resident (the engine drops what it built from it on eviction)."""
        first, n = entry.pages[0], len(entry.pages)
        if entry.pages[-1] - first == n - 1 and all(b == a + 1 for a, b in zip(entry.pages, entry.pages[1:])):
            return self.data[first : first + n].view(-1)[: entry.numel]
        return self.data.index_select(0, entry.page_index).view(-1)[: entry.numel]

    # -- LRU and pins -----------------------------------------------------------------------
    def touch(self, adapter_id: str) -> None:
        self._entries.move_to_end(adapter_id)

    def pin(self, adapter_id: str) -> None:
        self._entries[adapter_id].pins += 1
        self.touch(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        entry = self._entries.get(adapter_id)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def lru(self) -> list[str]:
        """Unpinned adapters, coldest first."""
        return [e.adapter_id for e in self._entries.values() if e.pins == 0]

    # -- accounting -------------------------------------------------------------------------
    def live_bytes(self) -> int:
        return sum(e.numel for e in self._entries.values()) * self._elem_bytes

    def stats(self) -> PoolStats:
        total = self.num_pages
        free = self.allocator.num_free
        live = self.live_bytes()
        return PoolStats(
            pages_total=total,
            pages_used=total - free,
            pages_free=free,
            page_bytes=self.page_bytes,
            live_bytes=live,
            utilisation=live / (total * self.page_bytes),
            adapters=len(self._entries),
        )


@dataclass
class ContiguousAllocator:
    """First-fit over one buffer of ``capacity`` units, with the same LRU eviction policy.

    Used only by the benchmark: under churn of mixed sizes, free memory splits into holes
    too small for the next adapter, so more live adapters are evicted than the bytes need.
    """

    capacity: int
    _holes: list[list[int]] = field(default_factory=list)  # sorted [offset, size]
    _live: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # LRU order

    def __post_init__(self) -> None:
        self._holes = [[0, self.capacity]]

    def _first_fit(self, size: int) -> int | None:
        for i, (offset, hole) in enumerate(self._holes):
            if hole >= size:
                if hole == size:
                    del self._holes[i]
                else:
                    self._holes[i] = [offset + size, hole - size]
                return offset
        return None

    def load(self, key: str, size: int) -> list[str]:
        """Place ``key``; evict the coldest adapters until a hole fits. Returns the evicted keys."""
        if size > self.capacity:
            raise PoolFullError(
                f"{size} units exceed the buffer's {self.capacity}", needed=size, available=self.capacity
            )
        evicted: list[str] = []
        offset = self._first_fit(size)
        while offset is None:
            victim = next(iter(self._live))
            self.release(victim)
            evicted.append(victim)
            offset = self._first_fit(size)
        self._live[key] = (offset, size)
        return evicted

    def release(self, key: str) -> None:
        """Free ``key``'s range and merge it with adjacent holes."""
        offset, size = self._live.pop(key)
        self._holes.append([offset, size])
        self._holes.sort()
        merged: list[list[int]] = []
        for hole in self._holes:
            if merged and merged[-1][0] + merged[-1][1] == hole[0]:
                merged[-1][1] += hole[1]
            else:
                merged.append(hole)
        self._holes = merged

    def touch(self, key: str) -> None:
        self._live.move_to_end(key)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    def ranges(self) -> dict[str, tuple[int, int]]:
        return dict(self._live)

    def live_units(self) -> int:
        return sum(size for _, size in self._live.values())

    def utilisation(self) -> float:
        return self.live_units() / self.capacity
