"""Batched multi-LoRA deltas, grouped by rank (the Punica SGMV / S-LoRA idea on plain torch ops).

A batch mixes rows of many adapters. The batch runs in an order where each adapter's rows
are adjacent, sorted by rank. Per projection site (the modules that share one input: q/k/v,
o, gate/up, down) a run of k adapters with the same rank, the same m rows each and the same
targeted modules is one group:

    x_g = x[start : start + k*m].view(k, m, in)            (a view: no gather, no padding)
    t   = bmm(x_g, A_cat)      -> [k, m, r * n_modules]   (A of every module of the site, side by side)
    y_j[start : start + k*m] += bmm(t_j, B_j)              (baddbmm_ in place; B pre-multiplied by the scaling)

so a rank-8 adapter costs rank-8 work even when a rank-128 adapter shares the batch, and the
weights of each adapter are read once per step however many rows use it. The stacked A/B
tensors are gathered from the page pool once per batch composition and cached, so a decode
step only runs the ops above.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapter_weights import LoraSlice

# Projection sites: the modules in each tuple read the same input tensor.
SITES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True)
class AdapterMeta:
    """What the engine keeps about a resident adapter besides its pages."""

    rank: int  # the largest rank of any of its modules
    layout: tuple[LoraSlice, ...]  # each module's own rank and scaling

    def slices(self) -> dict[tuple[int, str], LoraSlice]:
        return {(s.layer, s.module): s for s in self.layout}


@dataclass
class RankGroup:
    """k adapters of one rank with m rows each, adjacent in the batch, that target the same modules of a site."""

    modules: tuple[str, ...]  # the site's modules these adapters target, in site order
    rank: int
    k: int
    m: int
    start: int  # their rows are start .. start + k*m of the batch (the builder orders rows so)
    a_cat: torch.Tensor  # [k, in, rank * len(modules)]
    b: tuple[torch.Tensor, ...]  # per module [k, rank, out], scaled

    def apply(self, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """Add this group's LoRA deltas into the site's output tensors, in place (views only, no gathers)."""
        rows = slice(self.start, self.start + self.k * self.m)
        t = torch.bmm(x[rows].view(self.k, self.m, -1), self.a_cat)
        r = self.rank
        for j, module in enumerate(self.modules):
            y = outs[module][rows].view(self.k, self.m, -1)
            y.baddbmm_(t[:, :, j * r : (j + 1) * r], self.b[j])  # y += t_j @ (scaling * B_j^T)


@dataclass
class ViewGroup:
    """One adapter's m rows computed on views of its weights where they lie (no stacking): what a
    prefill uses when the adapter's stacks are not built yet, so a cold adapter's first token does
    not wait for them (its first decode step builds them). Two GEMMs per module; at prefill's many
    rows that costs what the stacked form costs."""

    start: int
    m: int
    modules: tuple[tuple[str, torch.Tensor, torch.Tensor, float], ...]  # (module, A [r, in], B [out, r], scaling)

    def apply(self, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        rows = slice(self.start, self.start + self.m)
        xs = x[rows]
        for module, a, b, scaling in self.modules:
            outs[module][rows].addmm_(torch.mm(xs, a.t()), b.t(), alpha=scaling)


class LoraBatch:
    """The LoRA work of one batch composition: rank groups per (layer, site).

    ``order`` is the row order the groups assume: the caller runs the batch with row i
    holding its request ``order[i]``, so each group's rows are one contiguous slice.
    """

    def __init__(self, groups: dict[tuple[int, str], list[RankGroup | ViewGroup]], order: list[int]) -> None:
        self.groups = groups
        self.order = order
        self.empty = not any(groups.values())

    def apply(self, layer: int, site: str, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """x: [N, in] (the site's shared input); outs: module -> [N, out] base outputs, updated in place."""
        for g in self.groups.get((layer, site), ()):
            g.apply(x, outs)


class StackCache:
    """Stacked, pre-scaled A/B tensors per (layer, site, adapters, modules), bounded by bytes.

    Filled from the page pool on a composition change; a decode step with an unchanged set
    of adapters only reads it. Entries holding an adapter are dropped when it leaves the pool
    (a re-loaded id may carry new weights).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = OrderedDict()
        self._bytes = 0
        self.builds = 0  # how many stacks were gathered (tests assert steady decode adds none)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple, build: Callable[[], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]):
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        value = build()
        self.builds += 1
        self._entries[key] = value
        self._bytes += _nbytes(value)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= _nbytes(old)
        return value

    def invalidate(self, adapter_id: str) -> None:
        for key in [k for k in self._entries if adapter_id in k[2]]:
            self._bytes -= _nbytes(self._entries.pop(key))

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _nbytes(value: tuple[torch.Tensor, tuple[torch.Tensor, ...]]) -> int:
    a, bs = value
    return a.numel() * a.element_size() + sum(b.numel() * b.element_size() for b in bs)


class LoraBatchBuilder:
    """Builds ``LoraBatch`` objects for row compositions, reading adapter weights from the pool."""

    def __init__(
        self,
        num_layers: int,
        metas: Callable[[str], AdapterMeta],
        read_flat: Callable[[str], torch.Tensor],
        cache: StackCache,
    ) -> None:
        self.num_layers = num_layers
        self._meta = metas
        self._read_flat = read_flat
        self.cache = cache

    def build(self, rows: list[str | None], prefill: bool = False) -> LoraBatch:
        """Order the rows so each adapter's rows are adjacent, then group adapters per (layer, site).

        ``prefill``: one adapter's prompt; where its stacks are not cached yet, compute on views of
        its weights instead of building them (``ViewGroup``), so a cold adapter's TTFT does not
        include the stacking; the first decode step with it builds the stacks.

        Rows are sorted by (rank, rows per adapter, targeted modules, adapter id), backbone-only
        rows last; a group is a run of adjacent adapters with the same rank, row count and modules
        at that site, so it is one [k, m, in] view of the batch: no padding, no gather.
        """
        by_adapter: dict[str, list[int]] = {}
        for i, adapter_id in enumerate(rows):
            if adapter_id is not None:
                by_adapter.setdefault(adapter_id, []).append(i)
        metas = {a: self._meta(a) for a in by_adapter}
        slices = {a: m.slices() for a, m in metas.items()}
        adapters = sorted(by_adapter, key=lambda a: (metas[a].rank, len(by_adapter[a]), sorted(slices[a]), a))
        order = [i for a in adapters for i in by_adapter[a]] + [i for i, a in enumerate(rows) if a is None]
        flats: dict[str, torch.Tensor] = {}  # each adapter's pages gathered at most once per build
        groups: dict[tuple[int, str], list[RankGroup | ViewGroup]] = {}
        for layer in range(self.num_layers):
            for site, modules in SITES.items():
                runs = _runs(adapters, lambda a: _site_key(slices[a], layer, modules, len(by_adapter[a])))  # noqa: B023 (called at once)
                groups[(layer, site)] = [
                    self._group(layer, site, key, ids, start, slices, flats, prefill)
                    for key, ids, start in runs
                    if key[2]
                ]
        return LoraBatch(groups, order)

    def _group(self, layer, site, key, ids, start, slices, flats, prefill=False) -> RankGroup | ViewGroup:
        rank, m, modules = key
        cache_key = (layer, site, ids, modules, rank)
        if prefill and len(ids) == 1 and cache_key not in self.cache:
            adapter = ids[0]
            if adapter not in flats:
                flats[adapter] = self._read_flat(adapter)
            views = []
            for module in modules:
                s = slices[adapter][(layer, module)]
                views.append((module, *s.pair(flats[adapter]), s.scaling))
            return ViewGroup(start, m, tuple(views))
        a_cat, bs = self.cache.get(cache_key, lambda: self._stack(layer, modules, ids, rank, slices, flats))
        return RankGroup(modules, rank, len(ids), m, start, a_cat, bs)

    def _stack(self, layer, modules, ids, rank, slices, flats) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[k, in, r*n] A^T side by side per module, and per module [k, r, out] scaling * B^T (r: the group's rank).

        Each weight is written once, straight into the stacked tensor (a transposing copy for A, a
        scaling multiply for B): a cold adapter's first batch pays one pass over its bytes here.
        A module of smaller rank than the group's (``rank_pattern``) is zero-padded.
        """
        k = len(ids)
        a_cat: torch.Tensor | None = None
        bs: list[torch.Tensor] = []
        for j, module in enumerate(modules):
            b_stack: torch.Tensor | None = None
            for i, adapter in enumerate(ids):
                if adapter not in flats:
                    flats[adapter] = self._read_flat(adapter)
                flat = flats[adapter]
                s = slices[adapter][(layer, module)]
                a, b = s.pair(flat)
                if a_cat is None:
                    a_cat = flat.new_empty(k, s.in_features, rank * len(modules))
                if b_stack is None:
                    b_stack = flat.new_empty(k, rank, s.out_features)
                cols = slice(j * rank, j * rank + s.rank)
                a_cat[i, :, cols].copy_(a.t())
                torch.mul(b.t(), s.scaling, out=b_stack[i, : s.rank])
                if s.rank < rank:  # zero rows / columns add exactly nothing
                    a_cat[i, :, j * rank + s.rank : (j + 1) * rank].zero_()
                    b_stack[i, s.rank :].zero_()
            assert b_stack is not None
            bs.append(b_stack)
        assert a_cat is not None
        return a_cat, tuple(bs)


def _site_key(
    slices: dict[tuple[int, str], LoraSlice], layer: int, modules: tuple[str, ...], rows: int
) -> tuple[int, int, tuple[str, ...]]:
    """(rank, rows, targeted modules) of one adapter at one site: the rank is the largest of those
    modules' own ranks (``rank_pattern`` may give each its own), so a group computes no more."""
    targeted = tuple(m for m in modules if (layer, m) in slices)
    return max((slices[(layer, m)].rank for m in targeted), default=0), rows, targeted


def _runs(adapters: list[str], key: Callable[[str], tuple]) -> list[tuple[tuple, tuple[str, ...], int]]:
    """Maximal runs of adjacent adapters sharing ``key``: (key, adapter ids, first row of the run)."""
    runs: list[tuple[tuple, tuple[str, ...], int]] = []
    row = 0
    for a in adapters:
        k = key(a)
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1] + (a,), runs[-1][2])
        else:
            runs.append((k, (a,), row))
        row += k[1]
    return runs
