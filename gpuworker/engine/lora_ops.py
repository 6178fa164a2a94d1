"""Batched multi-LoRA deltas, grouped by rank (the Punica SGMV / S-LoRA idea on plain torch ops).

A batch mixes rows of many adapters. Per projection site (the modules that share one input:
q/k/v, o, gate/up, down) the adapters are grouped by (rank, targeted modules). A group of
k adapters with at most m rows each runs as

    x_g = x[gather]            -> [k, m, in]   (rows padded with a zero row up to m)
    t   = bmm(x_g, A_cat)      -> [k, m, r * n_modules]   (A of every module of the site, side by side)
    y_j[scatter] += bmm(t_j, B_j)                          (B already multiplied by the scaling)

so a rank-8 adapter costs rank-8 work even when a rank-128 adapter shares the batch, and the
weights of each adapter are read once per step however many rows use it. The stacked A/B
tensors are gathered from the page pool once per batch composition and cached; the index
tensors are built once per composition too, so a decode step only runs the ops above.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

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
    """k adapters of one rank that target the same modules of one site, with their rows."""

    modules: tuple[str, ...]  # the site's modules these adapters target, in site order
    rank: int
    k: int
    m: int
    gather: torch.Tensor | slice  # rows of x (or x with a zero row appended) in [k*m] order
    scatter: torch.Tensor | slice  # rows of y for the same [k*m] order (pads point at row 0, add zero)
    padded: bool
    a_cat: torch.Tensor  # [k, in, rank * len(modules)]
    b: tuple[torch.Tensor, ...]  # per module [k, rank, out], scaled

    def apply(self, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """Add this group's LoRA deltas into the site's output tensors, in place."""
        xg = x[self.gather] if isinstance(self.gather, slice) else x.index_select(0, self.gather)
        t = torch.bmm(xg.view(self.k, self.m, -1), self.a_cat)
        r = self.rank
        for j, module in enumerate(self.modules):
            d = torch.bmm(t[:, :, j * r : (j + 1) * r], self.b[j]).view(self.k * self.m, -1)
            y = outs[module]
            if isinstance(self.scatter, slice):
                y[self.scatter].add_(d)
            else:
                y.index_add_(0, self.scatter, d)


class LoraBatch:
    """The LoRA work of one batch composition: rank groups per (layer, site)."""

    def __init__(self, groups: dict[tuple[int, str], list[RankGroup]]) -> None:
        self.groups = groups
        self.empty = not any(groups.values())

    def apply(self, layer: int, site: str, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """x: [N, in] (the site's shared input); outs: module -> [N, out] base outputs, updated in place."""
        groups = self.groups.get((layer, site))
        if not groups:
            return
        x_ext = None
        for g in groups:
            if g.padded:
                if x_ext is None:  # one zero row that every padded gather points at
                    x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
                g.apply(x_ext, outs)
            else:
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
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self._meta = metas
        self._read_flat = read_flat
        self.cache = cache
        self.device = device

    def build(self, rows: list[str | None]) -> LoraBatch:
        """Group the rows' adapters by (rank, modules) for every (layer, site)."""
        by_adapter: dict[str, list[int]] = {}
        for i, adapter_id in enumerate(rows):
            if adapter_id is not None:
                by_adapter.setdefault(adapter_id, []).append(i)
        metas = {a: self._meta(a) for a in by_adapter}
        slices = {a: m.slices() for a, m in metas.items()}
        flats: dict[str, torch.Tensor] = {}  # each adapter's pages gathered at most once per build
        index_memo: dict[tuple[str, ...], tuple] = {}
        groups: dict[tuple[int, str], list[RankGroup]] = {}
        for layer in range(self.num_layers):
            for site, modules in SITES.items():
                keyed: dict[tuple[int, tuple[str, ...]], list[str]] = {}
                for a in sorted(by_adapter):
                    targeted = tuple(m for m in modules if (layer, m) in slices[a])
                    if targeted:
                        keyed.setdefault((metas[a].rank, targeted), []).append(a)
                groups[(layer, site)] = [
                    self._group(layer, site, rank, targeted, tuple(ids), by_adapter, len(rows), metas, flats, index_memo)
                    for (rank, targeted), ids in sorted(keyed.items())
                ]
        return LoraBatch(groups)

    def _group(self, layer, site, rank, modules, ids, by_adapter, n_rows, metas, flats, index_memo) -> RankGroup:
        if ids not in index_memo:
            index_memo[ids] = _row_indices([by_adapter[a] for a in ids], n_rows, self.device)
        gather, scatter, m, padded = index_memo[ids]
        key = (layer, site, ids, modules)
        a_cat, bs = self.cache.get(key, lambda: self._stack(layer, modules, ids, metas, flats))
        return RankGroup(modules, rank, len(ids), m, gather, scatter, padded, a_cat, bs)

    def _stack(self, layer, modules, ids, metas, flats) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[k, in, r*n] A^T side by side per module, and per module [k, r, out] scaling * B^T."""
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
                a_list.append(a_mat.t())
                b_list.append(b_mat.t() * metas[a].scaling)
            a_cols.append(torch.stack(a_list))
            bs.append(torch.stack(b_list).contiguous())
        return torch.cat(a_cols, dim=2).contiguous(), tuple(bs)


def _row_indices(row_lists: list[list[int]], n_rows: int, device: torch.device) -> tuple:
    """Gather/scatter indices for k adapters' rows padded to m each; slices when rows are contiguous."""
    m = max(len(rows) for rows in row_lists)
    padded = any(len(rows) < m for rows in row_lists)
    gather: list[int] = []
    scatter: list[int] = []
    for rows in row_lists:
        pad = m - len(rows)
        gather += rows + [n_rows] * pad  # n_rows = the zero row appended to x
        scatter += rows + [0] * pad  # a zero delta added to row 0 changes nothing
    if not padded and gather == list(range(gather[0], gather[0] + len(gather))):
        whole = slice(gather[0], gather[0] + len(gather))
        return whole, whole, m, False
    g = torch.tensor(gather, dtype=torch.long, device=device)
    s = torch.tensor(scatter, dtype=torch.long, device=device)
    return g, s, m, padded
