"""The services freeze their startup heap so full collections do not stall serving (lorafaas/heap.py)."""

from __future__ import annotations

import subprocess
import sys

# Run in a child: freezing the test process's own heap would keep every test's startup objects for good.
CHILD = """
import gc
import torch, transformers  # the worker's startup heap
from lorafaas.heap import freeze_startup_heap

before = len(gc.get_objects())
freeze_startup_heap()
scanned = len(gc.get_objects())
print(before, gc.get_freeze_count(), scanned)
"""


def test_freeze_exempts_the_startup_heap_from_collections() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120)
    before, frozen, scanned = map(int, out.stdout.split())
    assert before > 50_000  # torch and transformers: what a full collection walked before
    assert frozen >= before * 0.9  # the survivors of one collection are frozen
    assert scanned < 1_000  # what a collection still walks: objects made after startup
