"""Live tensor bytes over a piece of work, op by op: the same count on real tensors (CPU) and on the meta device.

A TorchDispatchMode sees every op the code runs, forward and backward (autograd's backward ops pass through the
mode too). Each output's storage is counted once when it appears and uncounted when it is freed (a weak
reference to the storage expires). What is alive before the tracking starts (weights, adapters, optimizer
states) is not counted. On the meta device nothing is allocated but every storage has its size, so the very
same module run at the 12B shape gives that shape's peak without the memory.

The peak is exact to within `rel` (0.5%): frees are collected only when the running count passes the known peak
by that much (collecting at every op would be quadratic in the number of live tensors).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(t: torch.Tensor) -> int:
    """One number per storage (shared by all views of it), on every device including meta (whose data pointers
    are all 0): the address of the C++ StorageImpl."""
    return t.untyped_storage()._cdata


class MemoryTracker(TorchDispatchMode):
    """Peak bytes of the storages created inside the `with` block; gradient storages are told apart."""

    def __init__(self, existing: Iterable[torch.Tensor] = (), grads_of: Iterable[torch.Tensor] = (),
                 rel: float = 0.005):
        super().__init__()
        self.existing = {storage_key(t) for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.grad_keys: set[int] = set()
        self.upper = 0  # bytes counted minus bytes found freed at the last sweep: >= the bytes alive
        self.peak = 0  # the largest sweep result: peak <= true peak <= peak * (1 + rel)
        self.peak_grads = 0  # gradient bytes alive at that sweep
        self.peak_other = 0  # the largest non-gradient bytes seen at a sweep (activations and temporaries)
        self.rel = rel
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad) for p in grads_of]

    def _grad(self, p: torch.Tensor) -> None:
        self.grad_keys.add(storage_key(p.grad))
        self._sweep()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.live and key not in self.existing:
                    n = s.nbytes()
                    self.live[key] = (StorageWeakRef(s), n)
                    self.upper += n
        if self.upper > self.peak * (1 + self.rel):
            self._sweep()
        return out

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live.pop(key)
            self.grad_keys.discard(key)
        total = sum(n for _, n in self.live.values())
        grads = sum(self.live[k][1] for k in self.grad_keys if k in self.live)
        self.upper = total
        if total > self.peak:
            self.peak, self.peak_grads = total, grads
        self.peak_other = max(self.peak_other, total - grads)

    def __exit__(self, *exc):
        self._sweep()
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    @property
    def alive(self) -> int:
        """Bytes of the tracked storages alive at the last sweep (after the block: what it left behind)."""
        return self.upper


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())
