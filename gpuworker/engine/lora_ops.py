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
from functools import lru_cache

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

    rank: int
    scaling: float
    layout: tuple[LoraSlice, ...]

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
        n = self.k * self.m
        whole = self.start == 0 and n == x.shape[0]  # the usual case at batch 1: no slicing at all
        rows = slice(self.start, self.start + n)
        t = torch.bmm((x if whole else x[rows]).view(self.k, self.m, -1), self.a_cat)
        r = self.rank
        for j, module in enumerate(self.modules):
            out = outs[module]
            y = (out if whole else out[rows]).view(self.k, self.m, -1)
            y.baddbmm_(t if len(self.modules) == 1 else t[:, :, j * r : (j + 1) * r], self.b[j])  # y += t_j B_j


class LoraBatch:
    """The LoRA work of one batch composition: rank groups per (layer, site).

    ``order`` is the row order the groups assume: the caller runs the batch with row i
    holding its request ``order[i]``, so each group's rows are one contiguous slice.
    """

    def __init__(self, groups: dict[tuple[int, str], list[RankGroup]], order: list[int]) -> None:
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
        for key in [k for k in self._entries if adapter_id in k[2]]:  # key: (layer, modules, ids, rank)
            self._bytes -= _nbytes(self._entries.pop(key))

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _nbytes(value: tuple[torch.Tensor, tuple[torch.Tensor, ...]]) -> int:
    a, bs = value
    return a.numel() * a.element_size() + sum(b.numel() * b.element_size() for b in bs)


class LoraBatchBuilder:
    """Builds ``LoraBatch`` objects for row compositions, reading adapter weights from the pool.

    ``pad_op_bytes`` trades padding against launches: one group costs about as much as reading
    this many bytes, so adjacent ranks of one run are merged into one group padded with zeros to
    its largest rank when the bytes the padding adds cost less than the groups it saves
    (``_buckets``). 0 never pads (each rank its own group); on CUDA, where a launch costs about
    as much as reading megabytes, the engine sets it high (see ``LoraEngine``).
    """

    def __init__(
        self,
        num_layers: int,
        metas: Callable[[str], AdapterMeta],
        read_flat: Callable[[str], torch.Tensor],
        cache: StackCache,
        pad_op_bytes: int = 0,
        elem_bytes: int = 4,
    ) -> None:
        self.num_layers = num_layers
        self._meta = metas
        self._read_flat = read_flat
        self.cache = cache
        self.pad_op_bytes = pad_op_bytes
        self.elem_bytes = elem_bytes

    def build(self, rows: list[str | None]) -> LoraBatch:
        """Order the rows so each adapter's rows are adjacent, then group adapters per (layer, site).

        Rows are sorted by (rows per adapter, targeted modules, rank, adapter id), backbone-only
        rows last. At each site a run of adjacent adapters with the same row count and modules is
        one or more groups of adjacent ranks (``_buckets``); a group is one [k, m, in] view of the
        batch: no gather. Without padding a group holds one rank only.
        """
        by_adapter: dict[str, list[int]] = {}
        for i, adapter_id in enumerate(rows):
            if adapter_id is not None:
                by_adapter.setdefault(adapter_id, []).append(i)
        metas = {a: self._meta(a) for a in by_adapter}
        slices = {a: m.slices() for a, m in metas.items()}
        adapters = sorted(by_adapter, key=lambda a: (len(by_adapter[a]), sorted(slices[a]), metas[a].rank, a))
        order = [i for a in adapters for i in by_adapter[a]] + [i for i, a in enumerate(rows) if a is None]
        flats: dict[str, torch.Tensor] = {}  # each adapter's pages gathered at most once per build
        groups: dict[tuple[int, str], list[RankGroup]] = {}
        for layer in range(self.num_layers):
            for site, modules in SITES.items():
                runs = _runs(
                    adapters,
                    lambda a: (len(by_adapter[a]), tuple(m for m in modules if (layer, m) in slices[a])),  # noqa: B023 (called at once)
                )
                site_groups: list[RankGroup] = []
                for (m, mods), ids, start in runs:
                    if not mods:
                        continue
                    ranks = tuple(metas[a].rank for a in ids)
                    for part_lo, part_hi in _ascending_parts(ranks):
                        part = ranks[part_lo:part_hi]
                        for lo, hi in self._buckets(part, layer, mods, slices[ids[0]]):
                            bucket = ids[part_lo + lo : part_lo + hi]
                            rank = part[hi - 1]  # ascending: the largest, every other rank padded to it
                            row = start + (part_lo + lo) * m
                            site_groups.append(self._group(layer, (rank, m, mods), bucket, row, metas, flats))
                groups[(layer, site)] = site_groups
        return LoraBatch(groups, order)

    def _buckets(
        self, ranks: tuple[int, ...], layer: int, modules: tuple[str, ...], slices: dict
    ) -> list[tuple[int, int]]:
        """Split a run's ascending ranks into [lo, hi) groups, each padded to its largest rank.

        Minimises groups * pad_op_bytes + bytes read (sum over groups of k * rank * bytes per rank),
        by dynamic programming over the split points; 0 pad_op_bytes gives one group per rank.
        """
        if not self.pad_op_bytes:
            return [(lo, hi) for _, lo, hi in _equal_spans(ranks)]
        per_rank = sum(slices[(layer, m)].in_features + slices[(layer, m)].out_features for m in modules)
        per_rank *= self.elem_bytes
        return _best_buckets(ranks, self.pad_op_bytes * (1 + len(modules)), per_rank)

    def _group(self, layer, site_key, ids, start, metas, flats) -> RankGroup:
        rank, m, modules = site_key
        a_cat, bs = self.cache.get(
            (layer, modules, ids, rank), lambda: self._stack(layer, modules, ids, metas, flats, rank)
        )
        return RankGroup(modules, rank, len(ids), m, start, a_cat, bs)

    def _stack(self, layer, modules, ids, metas, flats, rank) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[k, in, R*n] A^T side by side per module, and per module [k, R, out] scaling * B^T, with
        each adapter's rank r zero-padded to the group's R (zeros add nothing to the product)."""
        a_cols, bs = [], []
        for module in modules:
            a_list, b_list = [], []
            for a in ids:
                if a not in flats:
                    flats[a] = self._read_flat(a)
                s = metas[a].slices()[(layer, module)]
                r = metas[a].rank
                a_mat = flats[a][s.a_offset : s.a_offset + r * s.in_features].view(r, s.in_features)
                b_mat = flats[a][s.b_offset : s.b_offset + s.out_features * r].view(s.out_features, r)
                a_t, b_t = a_mat.t(), b_mat.t() * metas[a].scaling
                if r < rank:
                    a_t = torch.nn.functional.pad(a_t, (0, rank - r))
                    b_t = torch.nn.functional.pad(b_t, (0, 0, 0, rank - r))
                a_list.append(a_t)
                b_list.append(b_t)
            a_cols.append(torch.stack(a_list))
            bs.append(torch.stack(b_list).contiguous())
        return torch.cat(a_cols, dim=2).contiguous(), tuple(bs)


def _equal_spans(ranks: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(rank, lo, hi) for each maximal span of equal ranks."""
    spans: list[tuple[int, int, int]] = []
    for i, r in enumerate(ranks):
        if spans and spans[-1][0] == r:
            spans[-1] = (r, spans[-1][1], i + 1)
        else:
            spans.append((r, i, i + 1))
    return spans


@lru_cache(maxsize=4096)
def _best_buckets(ranks: tuple[int, ...], group_cost: int, per_rank: int) -> list[tuple[int, int]]:
    """Optimal contiguous split of ascending ``ranks``: cost of a group [lo, hi) is
    ``group_cost + (hi - lo) * ranks[hi - 1] * per_rank``. Splits only between different ranks."""
    cuts = [lo for _, lo, _ in _equal_spans(ranks)] + [len(ranks)]
    best = {0: (0, [])}  # cut position -> (cost, groups)
    for j in cuts[1:]:
        options = []
        for i in cuts:
            if i >= j:
                break
            cost, groups = best[i]
            options.append((cost + group_cost + (j - i) * ranks[j - 1] * per_rank, [*groups, (i, j)]))
        best[j] = min(options, key=lambda o: o[0])
    return best[len(ranks)][1]


def _runs(adapters: list[str], key: Callable[[str], tuple]) -> list[tuple[tuple, tuple[str, ...], int]]:
    """Maximal runs of adjacent adapters sharing ``key`` (rows per adapter first):
    (key, adapter ids, first row of the run)."""
    runs: list[tuple[tuple, tuple[str, ...], int]] = []
    row = 0
    for a in adapters:
        k = key(a)
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1] + (a,), runs[-1][2])
        else:
            runs.append((k, (a,), row))
        row += k[0]
    return runs


def _ascending_parts(ranks: tuple[int, ...]) -> list[tuple[int, int]]:
    """[lo, hi) parts of a run where ranks never decrease (a run can join adapters whose other
    sites differ, each part sorted by rank)."""
    parts = [[0, 1]] if ranks else []
    for i in range(1, len(ranks)):
        if ranks[i] < ranks[i - 1]:
            parts.append([i, i + 1])
        else:
            parts[-1][1] = i + 1
    return [(lo, hi) for lo, hi in parts]
