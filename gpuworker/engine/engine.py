"""``LoraEngine``: continuous batching of many adapters over one shared backbone.

Each ``step()`` retires aborted requests, runs one decode step for every running request
(one forward pass whatever adapters they use), retires the finished ones, then admits
waiting requests into free slots and prefills them, each emitting its first token. So
requests join and leave the batch at token boundaries, and every request gets exactly one
token per step. The engine is driven from one thread and is not thread-safe.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorafaas.errors import InvalidArtifact, InvalidInput

from .adapter_weights import MODULES, AdapterWeights, module_dims
from .lora_ops import AdapterMeta, LoraBatch, LoraBatchBuilder, StackCache
from .model import LlamaRunner
from .pool import PagedAdapterPool, PoolEntry, PoolStats
from .sampling import make_generator, select_tokens
from .sequence import Detokenizer, Sequence, StopMatcher
from .types import FINISH_ABORT, FINISH_ERROR, EngineRequest, StepOutput

log = logging.getLogger(__name__)

RANK_UNIT = 8  # a page holds 8 ranks of one square (hidden x hidden) module: A and B
DEFAULT_POOL_ADAPTERS = 4  # default pool: room for this many rank-128 adapters on every linear module


def page_elems_for(config: Any) -> int:
    """Elements per page: A (8 x hidden) + B (hidden x 8) of one square module."""
    return RANK_UNIT * 2 * config.hidden_size


def default_pool_pages(config: Any) -> int:
    per_layer = sum(i + o for i, o in module_dims(config).values())
    numel = 128 * per_layer * config.num_hidden_layers
    return DEFAULT_POOL_ADAPTERS * -(-numel // page_elems_for(config))


class LoraEngine:
    """Batched multi-LoRA inference on one read-only HF Llama model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str = "cpu",
        max_batch: int = 16,
        pool_pages: int | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        cfg = model.config
        model_device = next(model.parameters()).device
        if torch.device(device).type != model_device.type:
            # The model's placement wins: moving it would make a second copy of the backbone.
            log.warning("engine device %s differs from the model's %s; using the model's", device, model_device)
        self.device = model_device
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # The context limit is the backbone's own (config.json, copied into its record at
        # registration): the gateway, the worker and the engine all hold requests to it.
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.runner = LlamaRunner(model, max_batch, self.max_seq_len)
        self.pool = PagedAdapterPool(
            pool_pages or default_pool_pages(cfg), page_elems_for(cfg), self.runner.dtype, self.device
        )
        self.stacks = StackCache(max_bytes=self.pool.num_pages * self.pool.page_bytes)
        self.builder = LoraBatchBuilder(cfg.num_hidden_layers, self._meta, self._read_flat, self.stacks)
        self.eos_ids = _eos_ids(cfg, tokenizer)
        self.last_step_s = 0.0
        # Seconds in each phase of the last decode step (the benchmark's per-token breakdown).
        self.timings: dict[str, float] = {}
        self.evicted_on_last_load: list[str] = []
        # Optional observer of every forward's logits (request ids, [rows, vocab]); tests and the
        # benchmark use it to compare with PEFT. None costs nothing on the hot path.
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # running[i] occupies KV slot i
        self._by_id: dict[str, Sequence] = {}
        self._aborts: set[str] = set()
        self._batch: _DecodeBatch | None = None

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, weights: AdapterWeights) -> None:
        """Copy an adapter host -> device pool on the calling thread, evicting LRU unpinned adapters first.

        A resident id is only touched (offload it first to replace its weights). Raises
        PoolFullError when it cannot fit even after evicting every unpinned adapter. The worker
        uses ``begin_load`` / ``PendingLoad.copy`` / ``finish_load`` instead, so that the copy
        runs outside the engine thread and does not stall the running batch.
        """
        pending = self.begin_load(adapter_id, weights)
        if pending is None:
            return
        try:
            pending.copy()
        except BaseException:
            self.abort_load(pending)
            raise
        self.finish_load(pending)

    def begin_load(self, adapter_id: str, weights: AdapterWeights) -> PendingLoad | None:
        """Reserve pool pages for an adapter (engine thread; bookkeeping only, no copy).

        Returns None when the adapter is already resident (it is touched). Evicts LRU unpinned
        adapters first; raises PoolFullError when it cannot fit, ValueError while another load
        of the same id is in flight. Run ``PendingLoad.copy`` on any thread, then ``finish_load``
        (or ``abort_load``) on the engine thread.
        """
        self.evicted_on_last_load = []
        if adapter_id in self.pool:
            self.pool.touch(adapter_id)
            return None
        self._check_fits_backbone(adapter_id, weights)
        meta = AdapterMeta(weights.rank, weights.layout)
        entry, evicted = self.pool.reserve(adapter_id, weights.numel, meta)
        for victim in evicted:
            self.stacks.invalidate(victim)
        self.evicted_on_last_load = evicted
        return PendingLoad(self.pool, entry, weights)

    def finish_load(self, pending: PendingLoad) -> None:
        """Make a copied adapter usable (engine thread). Idempotent."""
        if pending.finished:
            return
        if not pending.copied:
            raise RuntimeError(f"adapter {pending.entry.adapter_id!r}: finish_load before its copy")
        pending.wait_on_current_stream()
        self.pool.commit(pending.entry.adapter_id)
        pending.finished = True

    def abort_load(self, pending: PendingLoad) -> None:
        """Give back the pages of a load whose copy failed (engine thread)."""
        if not pending.finished:
            self.pool.release_reserved(pending.entry.adapter_id)
            pending.finished = True

    def offload_adapter(self, adapter_id: str) -> None:
        """Free an adapter's pages. A no-op if not resident; ValueError while requests use it (or while it loads)."""
        if not self.pool.holds(adapter_id):
            return
        self.pool.release(adapter_id)  # raises ValueError if pinned
        self.stacks.invalidate(adapter_id)

    def is_resident(self, adapter_id: str) -> bool:
        return adapter_id in self.pool

    def resident_adapters(self) -> dict[str, int]:
        return {e.adapter_id: e.meta.rank for e in self.pool.entries()}

    def lru_adapters(self) -> list[str]:
        return self.pool.lru()

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    def _meta(self, adapter_id: str) -> AdapterMeta:
        return self.pool.entry(adapter_id).meta

    def _read_flat(self, adapter_id: str) -> torch.Tensor:
        return self.pool.read(self.pool.entry(adapter_id))

    def _check_fits_backbone(self, adapter_id: str, weights: AdapterWeights) -> None:
        dims = module_dims(self.config)
        for s in weights.layout:
            if (
                s.module not in MODULES
                or s.layer >= self.config.num_hidden_layers
                or (s.in_features, s.out_features) != dims[s.module]
            ):
                raise InvalidArtifact(
                    f"adapter {adapter_id!r} was built for another backbone ({s.module} of layer {s.layer})",
                    file=weights.source,
                    tensor=f"layers.{s.layer}.{s.module}",
                )

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; its adapter must be resident and stays pinned until it finishes."""
        self._validate(req)
        if req.adapter_id is not None:
            self.pool.pin(req.adapter_id)
        gen = make_generator(req.seed, self.device) if req.temperature > 0 else None
        seq = Sequence(req, Detokenizer(self.tokenizer), StopMatcher(req.stop), gen)
        self._waiting.append(seq)
        self._by_id[req.request_id] = seq

    def _validate(self, req: EngineRequest) -> None:
        """ValueError for a caller of the engine that broke its contract; InvalidInput (a domain
        error, permanent: never worth a retry) for a request no engine could serve."""
        if req.request_id in self._by_id:
            raise ValueError(f"request {req.request_id!r} is already in the engine")
        if req.adapter_id is not None and req.adapter_id not in self.pool:
            raise ValueError(f"adapter {req.adapter_id!r} is not resident; load it first")
        if not req.prompt_ids:
            raise InvalidInput("the prompt is empty after tokenisation", param="prompt")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.config.vocab_size:
            raise InvalidInput("the prompt holds a token id outside the vocabulary", param="prompt")
        if req.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1", param="max_tokens")
        if len(req.prompt_ids) + req.max_tokens > self.max_seq_len:
            raise InvalidInput(
                f"prompt of {len(req.prompt_ids)} tokens plus max_tokens={req.max_tokens} exceeds the backbone's "
                f"context of {self.max_seq_len} tokens",
                param="prompt",
                limit=self.max_seq_len,
            )
        if not (req.temperature >= 0.0 and math.isfinite(req.temperature)):
            raise InvalidInput("temperature must be a finite number >= 0", param="temperature")
        if not (0.0 < req.top_p <= 1.0):
            raise InvalidInput("top_p must be in (0, 1]", param="top_p")

    def abort(self, request_id: str) -> None:
        """The next step() emits a finished output with finish_reason "abort" (unknown ids are ignored)."""
        if request_id in self._by_id:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One iteration: aborts, then either admit + prefill the waiting requests (their first
        tokens) or one decode for all running.

        Prefill first, as vLLM schedules by default: a new request's first token does not wait
        behind a decode step of the running batch, which costs those requests one step of
        inter-token time while requests arrive.
        """
        start = time.perf_counter()
        outputs = self._take_aborts()
        work: dict[str, int] = {}  # tokens each request processed in this step
        if self._waiting and len(self._running) < self.max_batch:
            outputs += self._admit(work)
        elif self._running:
            outputs += self._decode(work)
        self.last_step_s = time.perf_counter() - start
        total = sum(work.values())
        for out in outputs:
            out.device_s = self.last_step_s * work.get(out.request_id, 0) / total if total else 0.0
        return outputs

    def _take_aborts(self) -> list[StepOutput]:
        outputs = []
        for request_id in sorted(self._aborts):
            seq = self._by_id.get(request_id)
            if seq is None:
                continue
            if seq in self._waiting:
                self._waiting.remove(seq)
            else:
                self._retire(self._running.index(seq))
            self._forget(seq)
            outputs.append(_output(seq, -1, "", FINISH_ABORT, index=len(seq.generated)))
        self._aborts.clear()
        return outputs

    def _decode(self, work: dict[str, int]) -> list[StepOutput]:
        t0 = time.perf_counter()
        running = self._running
        rows = tuple(seq.req.adapter_id for seq in running)
        if self._batch is None or rows != self._batch.rows:
            self._batch = _DecodeBatch.build(rows, running, self.builder, self.device)
        batch = self._batch
        seqs = [running[i] for i in batch.lora.order]  # row order
        tokens = torch.tensor([seq.last_token for seq in seqs], dtype=torch.long, device=self.device)
        max_len = max(seq.length for seq in seqs) + 1
        t1 = time.perf_counter()
        logits = self.runner.decode(tokens, batch.positions, batch.slots, batch.inverse, max_len, batch.lora)
        batch.positions += 1
        if self.on_logits is not None:
            self.on_logits([seq.req.request_id for seq in seqs], logits)
        t2 = time.perf_counter()
        chosen, failed = self._select(logits, seqs)  # on CUDA this waits for the forward's kernels
        t3 = time.perf_counter()
        outputs, finished = [], []
        for row, (seq, token) in enumerate(zip(seqs, chosen)):
            seq.length += 1
            work[seq.req.request_id] = 1
            if row in failed:
                outputs.append(_failed(seq, failed[row]))
                finished.append(seq)
                continue
            text, reason = seq.append(token, self.eos_ids, self.max_seq_len)
            outputs.append(_output(seq, token, text, reason))
            if reason is not None:
                finished.append(seq)
        t4 = time.perf_counter()
        for seq in finished:
            self._forget(seq)
            self._retire(running.index(seq))
        self.timings = {
            "batch_inputs": t1 - t0,
            "forward": t2 - t1,
            "sample": t3 - t2,
            "detokenize": t4 - t3,
            "retire": time.perf_counter() - t4,
        }
        return outputs

    def _admit(self, work: dict[str, int]) -> list[StepOutput]:
        outputs = []
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting.popleft()
            slot = len(self._running)
            self._running.append(seq)
            t0 = time.perf_counter()
            rows = [seq.req.adapter_id] * len(seq.req.prompt_ids)
            ids = torch.tensor(seq.req.prompt_ids, dtype=torch.long, device=self.device)
            logits = self.runner.prefill(slot, ids, self.builder.build(rows, prefill=True))
            seq.length = len(seq.req.prompt_ids)
            if self.on_logits is not None:
                self.on_logits([seq.req.request_id], logits[None])
            chosen, failed = self._select(logits[None], [seq])
            seq.prefill_s = time.perf_counter() - t0
            work[seq.req.request_id] = seq.length
            reason: str | None
            if failed:
                out, reason = _failed(seq, failed[0]), FINISH_ERROR
            else:
                text, reason = seq.append(chosen[0], self.eos_ids, self.max_seq_len)
                out = _output(seq, chosen[0], text, reason)
            out.prefill_s = seq.prefill_s
            outputs.append(out)
            if reason is not None:
                self._forget(seq)
                self._retire(slot)
        return outputs

    def _select(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, str]]:
        """Tokens per row, and the rows (requests) that failed with the reason: they end alone."""
        temps = [s.req.temperature for s in seqs]
        top_ps = [s.req.top_p for s in seqs]
        chosen, failed = select_tokens(logits, temps, top_ps, [s.generator for s in seqs])
        for row, reason in failed.items():
            log.warning("request %s failed in the engine: %s", seqs[row].req.request_id, reason)
        return chosen, failed

    def _retire(self, index: int) -> None:
        """Free slot ``index``: wipe it, move the last running request into it (slots stay dense)."""
        seq = self._running[index]
        last = len(self._running) - 1
        self.runner.clear_slot(index, seq.length)
        if index != last:
            moved = self._running[last]
            self.runner.move_slot(last, index, moved.length)
            self.runner.clear_slot(last, moved.length)
            self._running[index] = moved
        self._running.pop()
        self._batch = None  # the composition changed

    def _forget(self, seq: Sequence) -> None:
        """Drop a finished request's bookkeeping and unpin its adapter."""
        self._by_id.pop(seq.req.request_id, None)
        self._aborts.discard(seq.req.request_id)
        if seq.req.adapter_id is not None:
            self.pool.unpin(seq.req.adapter_id)


class PendingLoad:
    """One adapter's host -> device copy into pages reserved by ``LoraEngine.begin_load``.

    ``copy`` may run on any thread while the engine thread keeps stepping: it writes only the
    reserved pages, which no step reads before ``finish_load``. On CUDA the copy goes from
    pinned host memory on a side stream, so it overlaps the step's kernels too; ``finish_load``
    makes the compute stream wait for it (an event, no host sync).
    """

    def __init__(self, pool: PagedAdapterPool, entry: PoolEntry, weights: AdapterWeights) -> None:
        self.pool, self.entry, self.weights = pool, entry, weights
        self.copied = False
        self.finished = False
        self.copy_s = 0.0
        self._event: Any = None

    def copy(self) -> None:
        """Write the weights into the reserved pages; returns once they are there."""
        start = time.perf_counter()
        device = self.pool.data.device
        if device.type == "cuda":
            stream = _side_stream(device)
            with torch.cuda.stream(stream):
                self.pool.write(self.entry, self.weights.flat)
                self._event = torch.cuda.Event()
                self._event.record(stream)
            self._event.synchronize()  # blocks this (copy) thread only, never the step
        else:
            self.pool.write(self.entry, self.weights.flat)
        self.copy_s = time.perf_counter() - start
        self.copied = True

    def wait_on_current_stream(self) -> None:
        if self._event is not None:
            torch.cuda.current_stream(self.pool.data.device).wait_event(self._event)


_SIDE_STREAMS: dict[Any, Any] = {}


def _side_stream(device: torch.device) -> Any:
    """One copy stream per CUDA device, shared by every load."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


@dataclass
class _DecodeBatch:
    """Everything a decode step needs that only changes with the batch composition."""

    rows: tuple[str | None, ...]  # adapter per running request, in slot order
    lora: LoraBatch  # rank groups; lora.order[i] = the slot that row i runs
    slots: torch.Tensor  # row -> slot
    inverse: torch.Tensor | None  # slot -> row (None when rows are in slot order)
    positions: torch.Tensor  # per row: tokens cached (advanced in place after each step)

    @classmethod
    def build(cls, rows, running: list[Sequence], builder: LoraBatchBuilder, device: torch.device) -> _DecodeBatch:
        lora = builder.build(list(rows))
        order = lora.order
        slots = torch.tensor(order, dtype=torch.long, device=device)
        identity = order == list(range(len(order)))
        inverse = None if identity else torch.argsort(slots)
        positions = torch.tensor([running[i].length for i in order], dtype=torch.long, device=device)
        return cls(rows, lora, slots, inverse, positions)


def _output(seq: Sequence, token: int, text: str, reason: str | None, index: int | None = None) -> StepOutput:
    return StepOutput(
        request_id=seq.req.request_id,
        token_id=token,
        text=text,
        index=len(seq.generated) - 1 if index is None else index,
        finished=reason is not None,
        finish_reason=reason,
        prompt_tokens=len(seq.req.prompt_ids),
        device_s=0.0,
    )


def _failed(seq: Sequence, reason: str) -> StepOutput:
    """The last output of a request that failed alone: no token, the reason in ``error``."""
    out = _output(seq, -1, "", FINISH_ERROR, index=len(seq.generated))
    out.error = reason
    return out


def _eos_ids(config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
