"""Runs the feature families of a batch side by side and evaluates their network calls.

Round by round, every family yields the calls it needs next. With sharing on, calls with
the same key are evaluated once (a call with a gradient also serves the same call without
one), results are kept for later rounds, and the remaining calls of a round are fused into
as few network calls as ``max_fused`` samples allow, with a timestep per sample. Given
each family's depth (its number of levels), calls that can wait are spread over the rounds
so that every round's network calls are of similar size (see :meth:`CallScheduler.run`);
neither the values nor the pass counts change, only how calls are grouped. With
sharing off, every call is its own network call: the straightforward way, the benchmark's
baseline.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from cdi.features.context import Call, CallResult, FamilyRun, PassCounter
from cdi.features.passes import PassRunner
from cdi.models.base import DiffusionAdapter


@dataclass
class _Level:
    """A family's calls of one level, their results as they arrive, and the level's deadline."""

    calls: list[Call]
    results: list[CallResult | None]
    deadline: int
    #: Levels the family has still to yield after this one.
    after: int = 0

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.results)


@dataclass
class _Slot:
    """One distinct network call of a round and the family calls it answers."""

    call: Call
    deadline: int
    requesters: list[tuple[_Level, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.call.z.shape[0])


class CallScheduler:
    def __init__(self, adapter: DiffusionAdapter, cond: torch.Tensor | None, counter: PassCounter,
                 *, share: bool = True, max_fused: int = 512, runner: PassRunner | None = None,
                 cache: dict[Hashable, CallResult] | None = None) -> None:
        self.adapter = adapter
        self.cond = cond
        self.counter = counter
        self.share = share
        self.max_fused = max(1, max_fused)
        self.runner = runner or PassRunner(adapter)
        #: Results by call key; shared with the caller's other schedulers when it gives one.
        self._cache: dict[Hashable, CallResult] = {} if cache is None else cache

    def run(self, families: dict[str, FamilyRun],
            depths: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Drive every family to completion; returns each family's output ``[B, k]``.

        ``depths`` gives each family's number of levels (the lists of calls it yields, one
        after another). With sharing on, they set the horizon (the deepest family's levels,
        one round each) and each level's deadline: a family of d levels spreads them evenly
        over the rounds left, and a round evaluates the calls due now plus as many of the
        others as keep the work of the remaining rounds level (counting, for the rounds to
        come, each family's later levels as large as its current one). Shallow families (GM, ML,
        DL) then fill the rounds in which deep chains (SecMI's inversion, NO's optimiser
        steps) would otherwise make small network calls. Without depths, every call is due
        in the round it is asked for.
        """
        outputs: dict[str, torch.Tensor] = {}
        remaining = {name: (depths or {}).get(name, 1) for name in families}
        horizon = max(remaining.values(), default=1) if self.share else 0
        levels: dict[str, _Level] = {}
        rnd = 0

        def advance(name: str, reply: list[CallResult] | None) -> None:
            gen = families[name]
            try:
                calls = next(gen) if reply is None else gen.send(reply)
            except StopIteration as stop:
                outputs[name] = stop.value
                return
            d = remaining[name]
            remaining[name] = d - 1
            left = horizon - rnd
            span = left // d if d >= 1 and left >= d else 1
            levels[name] = _Level(list(calls), [None] * len(calls), rnd + span - 1, max(d - 1, 0))

        for name in families:
            advance(name, None)
        while levels:
            self._round(list(levels.values()), rnd, horizon)
            rnd += 1
            for name in [n for n, lv in levels.items() if lv.complete]:
                done = levels.pop(name)
                advance(name, [r for r in done.results if r is not None])
        return outputs

    def _slot(self, call: Call) -> Hashable:
        if self.share and call.key is not None:
            return ("key", call.key)
        return ("call", id(call))

    def _round(self, levels: Sequence[_Level], rnd: int, horizon: int) -> None:
        """Evaluate this round's share of the outstanding calls and hand out the results."""
        slots: dict[Hashable, _Slot] = {}
        for lv in levels:
            for i, c in enumerate(lv.calls):
                if lv.results[i] is not None:
                    continue
                cached = self._cache.get(c.key) if self.share and c.key is not None else None
                if cached is not None and cached.serves(c):
                    lv.results[i] = cached
                    continue
                key = self._slot(c)
                slot = slots.get(key)
                if slot is None:
                    slot = slots[key] = _Slot(c, lv.deadline)
                else:
                    # One evaluation answers every request: with a gradient if one asks for
                    # it, isolated if one asks for that.
                    merged = slot.call
                    if c.needs_grad and not merged.needs_grad:
                        merged = replace(merged, target=c.target)
                    if c.isolated and not merged.isolated:
                        merged = replace(merged, isolated=True)
                    slot.call = merged
                slot.deadline = min(slot.deadline, lv.deadline)
                slot.requesters.append((lv, i))
        for with_grad in (True, False):
            # Isolated calls cannot be fused, so levelling gains nothing: they run at once.
            alone = [[(k, s.call)] for k, s in slots.items() if s.call.needs_grad == with_grad and s.call.isolated]
            group = [(k, s) for k, s in slots.items() if s.call.needs_grad == with_grad and not s.call.isolated]
            # The work expected in later rounds: each family's later levels, as large as this.
            expected = sum(
                lv.after * sum(int(c.z.shape[0]) for c in lv.calls
                               if c.needs_grad == with_grad and not c.isolated)
                for lv in levels
            )
            chosen = self._due(group, rnd, horizon - rnd, expected)
            fused = [(k, slots[k].call) for k in chosen]
            limit = min(self.max_fused, self.runner.budget.limit(with_grad))
            for chunk in [*self._chunks(fused, limit), *alone]:
                calls = [c for _, c in chunk]
                outs = self._isolated(calls[0], with_grad) if calls[0].isolated else self._network(calls, with_grad)
                for (key, call), res in zip(chunk, outs, strict=True):
                    if self.share and call.key is not None:
                        self._cache[call.key] = res
                    for lv, i in slots[key].requesters:
                        lv.results[i] = res

    @staticmethod
    def _due(group: list[tuple[Hashable, _Slot]], rnd: int, rounds_left: int, expected: int) -> list[Hashable]:
        """The slots to evaluate this round, in request order.

        Every slot due this round, and then, earliest deadline first, enough of the others
        that the samples evaluated per round never need to exceed the rate taken now: the
        largest over deadlines D of (samples due by D) / (rounds until D, this one
        included), and at least all known and ``expected`` samples over the rounds left.
        Without sharing every deadline is this round, so every slot is taken.
        """
        order = sorted(range(len(group)), key=lambda j: group[j][1].deadline)
        rate, total = 0, 0
        for j in order:
            slot = group[j][1]
            total += slot.size
            rate = max(rate, -(-total // (max(slot.deadline - rnd, 0) + 1)))
        rate = max(rate, -(-(total + expected) // max(rounds_left, 1)))
        take: set[int] = set()
        taken = 0
        for j in order:
            slot = group[j][1]
            if taken >= rate and slot.deadline > rnd:
                break
            take.add(j)
            taken += slot.size
        return [group[j][0] for j in sorted(take)]

    def _chunks(self, group: list[tuple[Hashable, Call]],
                limit: int | None = None) -> list[list[tuple[Hashable, Call]]]:
        """Split a round's calls into as few network calls as ``limit`` samples allow (by
        default ``max_fused``), of even size.

        Even sizes matter on CPU: 320 samples as 128 + 96 + 96 run faster than as
        128 + 128 + 64, whose small remainder pays the per-call overhead for few samples.
        A call is never split; one larger than ``max_fused`` is a network call of its own.
        """
        if not self.share:
            return [[item] for item in group]
        cap = self.max_fused if limit is None else max(1, limit)
        sizes = [int(c.z.shape[0]) for _, c in group]
        total = sum(sizes)
        pieces = max(1, -(-total // cap))
        while True:
            chunks: list[list[tuple[Hashable, Call]]] = []
            filled: list[int] = []
            start = 0
            for item, n in zip(group, sizes, strict=True):
                # Piece of the call's first sample, on an even grid of `pieces` pieces.
                piece = start * pieces // total
                if not chunks or piece >= len(chunks) or filled[-1] + n > cap:
                    chunks.append([])
                    filled.append(0)
                chunks[-1].append(item)
                filled[-1] += n
                start += n
            if len(chunks) <= pieces or pieces >= len(group):
                return chunks
            pieces += 1

    def _call_cond(self, call: Call) -> torch.Tensor | None:
        """The conditioning of ``call``'s samples: the batch's, or that of its rows."""
        if self.cond is None or call.rows is None:
            return self.cond
        return self.cond[list(call.rows)]

    def _isolated(self, call: Call, with_grad: bool) -> list[CallResult]:
        """``call`` evaluated one sample per network call; one result for the whole call."""
        cond = self._call_cond(call)
        eps, grads = [], []
        for i in range(int(call.z.shape[0])):
            e, g = self.runner.run(
                call.z[i : i + 1], torch.full((1,), call.t, dtype=torch.long, device=call.z.device),
                None if cond is None else cond[i : i + 1],
                None if call.target is None or not with_grad else call.target[i : i + 1],
            )
            eps.append(e)
            if g is not None:
                grads.append(g)
        n = int(call.z.shape[0])
        self.counter.forward += n
        self.counter.backward += n if with_grad else 0
        return [CallResult(torch.cat(eps), torch.cat(grads) if grads else None, isolated=True)]

    def _network(self, calls: list[Call], with_grad: bool) -> list[CallResult]:
        """One network call on the concatenation of ``calls``; per-sample timesteps.

        The runner splits it where the memory budget asks; the values do not depend on that
        beyond float rounding.
        """
        sizes = [int(c.z.shape[0]) for c in calls]
        z = torch.cat([c.z for c in calls]) if len(calls) > 1 else calls[0].z
        device = z.device
        t = torch.cat([
            torch.full((n,), c.t, dtype=torch.long, device=device) for c, n in zip(calls, sizes, strict=True)
        ])
        cond = self.cond
        if cond is not None and (len(calls) > 1 or calls[0].rows is not None):
            cond = torch.cat([self._call_cond(c) for c in calls])  # type: ignore[misc]
        total = sum(sizes)
        target = torch.cat([c.target for c in calls if c.target is not None]) if with_grad else None
        eps, grad = self.runner.run(z, t, cond, target)
        self.counter.forward += total
        if grad is None:
            return [CallResult(e) for e in torch.split(eps, sizes)]
        self.counter.backward += total
        return [CallResult(e, g) for e, g in zip(torch.split(eps, sizes), torch.split(grad, sizes), strict=True)]
