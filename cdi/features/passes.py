"""Network passes on the device: precision, sizes that fit in memory, and out-of-memory retries.

The scheduler (:mod:`cdi.features.scheduler`) decides which samples go into one network
call; :class:`PassRunner` evaluates them. It

- runs the network under bfloat16 (float16 where bfloat16 is unavailable) autocast when
  asked (the default on CUDA), and hands back float32 ε̂ and gradients, so that every feature
  is accumulated in float32;
- splits a call into pieces that fit a memory budget: each kind of pass (with and without
  an input gradient) learns its memory per sample from its first call, and a pass is never
  larger than the budget allows nor than the count limits set by the extractor;
- on an out-of-memory error, halves the pass, lowers the limit for the passes to come and
  retries: no sample is lost, and the values are those of smaller calls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from cdi.errors import DeviceMemoryError
from cdi.features.context import FP32_ROUNDING, REDUCED_ROUNDING, l2
from cdi.models.base import DiffusionAdapter

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; ``None`` for plain float32.

    ``auto`` is bfloat16 on CUDA (float16 where the GPU lacks bfloat16) and float32 on the
    CPU, where reduced precision is slower on most processors and the reference is float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CUDA or CPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


@dataclass
class MemoryBudget:
    """How many samples one network pass may hold, per kind (``True``: with a gradient).

    ``bytes`` is the memory passes may use (``None``: no byte limit, only the counts);
    ``per_sample`` is learned from the first pass of each kind; ``counts`` are the fixed
    limits and ``backoff`` the limits learned from out-of-memory errors.
    """

    bytes: int | None = None
    counts: dict[bool, int] = field(default_factory=lambda: {True: 1 << 30, False: 1 << 30})
    per_sample: dict[bool, float] = field(default_factory=dict)
    backoff: dict[bool, int] = field(default_factory=dict)

    def limit(self, with_grad: bool) -> int:
        n = min(self.counts[with_grad], self.backoff.get(with_grad, 1 << 30))
        cost = self.per_sample.get(with_grad)
        if self.bytes is not None and cost:
            n = min(n, int(self.bytes // cost))
        return max(1, n)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device (``None`` elsewhere)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


class PassRunner:
    """Evaluates ε̂ (and ∂‖ε̂ − target‖₂/∂z) for a stack of samples, within a memory budget."""

    def __init__(self, adapter: DiffusionAdapter, *, precision: str = "auto",
                 budget: MemoryBudget | None = None) -> None:
        self.adapter = adapter
        self.autocast = autocast_dtype(precision, adapter.device)
        self.budget = budget or MemoryBudget()
        #: Network passes made by the last :meth:`run` (more than one after a split).
        self.calls = 0

    @property
    def rounding(self) -> float:
        """Bound on how far another call's rounding moves a gradient entry (see ``Batch``)."""
        reduced = self.autocast is not None or self.adapter.dtype != torch.float32
        if self.adapter.device.type == "cuda":
            reduced = reduced or torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        return REDUCED_ROUNDING if reduced else FP32_ROUNDING

    def run(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
            target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ε̂ ``[N, *z]`` float32 and, with ``target``, the gradient ``[N, *z]`` float32."""
        with_grad = target is not None
        n = int(z.shape[0])
        limit = self.budget.limit(with_grad)
        if n > limit:
            return self._split(z, t, cond, target, -(-n // limit))
        try:
            return self._measured(z, t, cond, target)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if n == 1:
                raise DeviceMemoryError(
                    "one sample's network pass does not fit in the device's memory: use a "
                    "smaller model, a lower precision or a device with more memory"
                ) from exc
            self.budget.backoff[with_grad] = max(1, n // 2)
            if self.adapter.device.type == "cuda":
                torch.cuda.empty_cache()
            return self._split(z, t, cond, target, 2)

    def _split(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
               target: torch.Tensor | None, pieces: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = int(z.shape[0])
        bounds = [n * i // pieces for i in range(pieces + 1)]
        eps, grads = [], []
        for a, b in itertools.pairwise(bounds):
            e, g = self.run(z[a:b], t[a:b], None if cond is None else cond[a:b],
                            None if target is None else target[a:b])
            eps.append(e)
            if g is not None:
                grads.append(g)
        return torch.cat(eps), (torch.cat(grads) if grads else None)

    def _measured(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                  target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass; the first of each kind also measures its memory per sample."""
        with_grad = target is not None
        device = self.adapter.device
        if with_grad in self.budget.per_sample:
            return self._pass(z, t, cond, target)
        n = int(z.shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = self._pass(z, t, cond, target)
            peak = torch.cuda.max_memory_allocated(device) - start
            self.budget.per_sample[with_grad] = max(1.0, peak / n)
            return out
        if not with_grad:
            return self._pass(z, t, cond, target)
        # On the CPU the allocator keeps no peak: count what autograd keeps for the backward
        # pass, the bulk of a gradient pass's memory.
        saved = [0]

        def pack(x: torch.Tensor) -> torch.Tensor:
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = self._pass(z, t, cond, target)
        self.budget.per_sample[with_grad] = max(1.0, saved[0] / n)
        return out

    def _pass(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
              target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        device_type = self.adapter.device.type
        amp = torch.autocast(device_type, dtype=self.autocast or torch.float32,
                             enabled=self.autocast is not None)
        if target is None:
            with torch.inference_mode(), amp:
                eps = self.adapter.eps(z, t, cond)
            return eps.float().clone(), None  # a normal tensor, usable beside autograd later
        with torch.enable_grad():
            zg = z.detach().clone().requires_grad_(True)
            with amp:
                eps = self.adapter.eps(zg, t, cond)
            # Summed per-sample norms, in float32: each sample's gradient is that of its own norm.
            (grad,) = torch.autograd.grad(l2(eps.float() - target).sum(), zg)
        return eps.detach().float(), grad.float()
