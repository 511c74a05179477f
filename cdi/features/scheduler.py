"""Runs the feature families of a batch side by side and evaluates their network calls.

Round by round, every family yields the calls it needs next. With sharing on, calls with
the same key are evaluated once (a call with a gradient also serves the same call without
one), results are kept for later rounds, and the remaining calls of a round are fused into
as few network calls as ``max_fused`` samples allow, with a timestep per sample. With
sharing off, every call is its own network call: the straightforward way, the benchmark's
baseline.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from cdi.features.context import Call, CallResult, FamilyRun, PassCounter, l2
from cdi.models.base import DiffusionAdapter


class CallScheduler:
    def __init__(self, adapter: DiffusionAdapter, cond: torch.Tensor | None, counter: PassCounter,
                 *, share: bool = True, max_fused: int = 512) -> None:
        self.adapter = adapter
        self.cond = cond
        self.counter = counter
        self.share = share
        self.max_fused = max(1, max_fused)
        self._cache: dict[Hashable, CallResult] = {}

    def run(self, families: dict[str, FamilyRun]) -> dict[str, torch.Tensor]:
        """Drive every family to completion; returns each family's output ``[B, k]``."""
        outputs: dict[str, torch.Tensor] = {}
        pending: dict[str, list[Call]] = {}
        for name, gen in families.items():
            self._advance(name, gen, None, pending, outputs)
        while pending:
            requested = [c for calls in pending.values() for c in calls]
            results = self._evaluate(requested)
            current, pending = pending, {}
            for name, calls in current.items():
                reply = [results[self._slot(c)] for c in calls]
                self._advance(name, families[name], reply, pending, outputs)
        return outputs

    @staticmethod
    def _advance(name: str, gen: FamilyRun, reply: list[CallResult] | None,
                 pending: dict[str, list[Call]], outputs: dict[str, torch.Tensor]) -> None:
        try:
            pending[name] = next(gen) if reply is None else gen.send(reply)
        except StopIteration as stop:
            outputs[name] = stop.value

    def _slot(self, call: Call) -> Hashable:
        if self.share and call.key is not None:
            return ("key", call.key)
        return ("call", id(call))

    def _evaluate(self, calls: Sequence[Call]) -> dict[Hashable, CallResult]:
        results: dict[Hashable, CallResult] = {}
        todo: dict[Hashable, Call] = {}
        for c in calls:
            slot = self._slot(c)
            cached = self._cache.get(c.key) if self.share and c.key is not None else None
            if cached is not None and (cached.grad is not None or not c.needs_grad):
                results[slot] = cached
                continue
            held = todo.get(slot)
            if held is None or (c.needs_grad and not held.needs_grad):
                todo[slot] = c
        items = list(todo.items())
        for with_grad in (True, False):
            group = [(s, c) for s, c in items if c.needs_grad == with_grad]
            for chunk in self._chunks(group):
                outs = self._network([c for _, c in chunk], with_grad)
                for (slot, call), res in zip(chunk, outs, strict=True):
                    results[slot] = res
                    if self.share and call.key is not None:
                        self._cache[call.key] = res
        return results

    def _chunks(self, group: list[tuple[Hashable, Call]]) -> list[list[tuple[Hashable, Call]]]:
        """Split a round's calls into as few network calls as ``max_fused`` allows, of even size.

        Even sizes matter on CPU: 320 samples as 128 + 96 + 96 run faster than as
        128 + 128 + 64, whose small remainder pays the per-call overhead for few samples.
        A call is never split; one larger than ``max_fused`` is a network call of its own.
        """
        if not self.share:
            return [[item] for item in group]
        sizes = [int(c.z.shape[0]) for _, c in group]
        total = sum(sizes)
        pieces = max(1, -(-total // self.max_fused))
        while True:
            chunks: list[list[tuple[Hashable, Call]]] = []
            filled: list[int] = []
            start = 0
            for item, n in zip(group, sizes, strict=True):
                # Piece of the call's first sample, on an even grid of `pieces` pieces.
                piece = start * pieces // total
                if not chunks or piece >= len(chunks) or filled[-1] + n > self.max_fused:
                    chunks.append([])
                    filled.append(0)
                chunks[-1].append(item)
                filled[-1] += n
                start += n
            if len(chunks) <= pieces or pieces >= len(group):
                return chunks
            pieces += 1

    def _network(self, calls: list[Call], with_grad: bool) -> list[CallResult]:
        """One network call on the concatenation of ``calls``; per-sample timesteps."""
        sizes = [int(c.z.shape[0]) for c in calls]
        z = torch.cat([c.z for c in calls]) if len(calls) > 1 else calls[0].z
        device = z.device
        t = torch.cat([
            torch.full((n,), c.t, dtype=torch.long, device=device) for c, n in zip(calls, sizes, strict=True)
        ])
        cond = self.cond
        if cond is not None and len(calls) > 1:
            cond = torch.cat([cond] * len(calls))
        total = sum(sizes)
        if not with_grad:
            with torch.inference_mode():
                eps = self.adapter.eps(z, t, cond)
            eps = eps.clone()  # a normal tensor, usable beside autograd later
            self.counter.forward += total
            return [CallResult(e) for e in eps.split(sizes)]
        target = torch.cat([c.target for c in calls if c.target is not None])
        with torch.enable_grad():
            zg = z.detach().clone().requires_grad_(True)
            eps = self.adapter.eps(zg, t, cond)
            # Summed per-sample norms: each sample's gradient is that of its own norm.
            (grad,) = torch.autograd.grad(l2(eps - target).sum(), zg)
        self.counter.forward += total
        self.counter.backward += total
        return [CallResult(e, g) for e, g in zip(eps.detach().split(sizes), grad.split(sizes), strict=True)]
