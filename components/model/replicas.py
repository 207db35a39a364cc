"""Data-parallel replicas of one training run: what each of N workers does so that N of them compute what one
process computes on the same global batch.

- Each worker takes a contiguous slice of every global batch (``take``), in the one process's order, so the slices
  joined in rank order are that batch.
- Every worker computes the *global* loss: what a method's loss depends on across the batch (image features,
  logits, labels) is gathered from every worker (``gather``), in rank order. The gather is differentiable: its
  backward sums the gradient every worker's copy of the loss sends to a row, and returns its own rows' sum.
- After backward, each parameter's gradient is averaged over the workers (``mean_grads``), before a method's
  gradient hook (GNSP's projection) and the optimizer step, so every worker steps identically.

Why the sum and the mean agree with one process: the loss L is the same on every worker. A parameter reached
through this worker's rows (the image tower on its slice) gets, from the gather's backward, N copies of its
rows' share of dL, and the mean over workers of those shares is the whole dL. A parameter reached through a
computation every worker repeats identically (the class-prompt text features) gets the whole dL on each worker,
and its mean over workers is that dL again.

With one worker (``SINGLE``) every operation is the identity and nothing of ``torch.distributed`` is touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of {self.world} workers")

    @property
    def single(self) -> bool:
        return self.world == 1

    def sizes(self, n: int) -> list[int]:
        """Rows of a batch of ``n`` per worker: as even as possible, the first workers one more."""
        base, extra = divmod(n, self.world)
        return [base + (1 if r < extra else 0) for r in range(self.world)]

    def bounds(self, n: int) -> tuple[int, int]:
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def take(self, items: Sequence):
        """This worker's slice of a global batch (of indices, rows, ...)."""
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every worker's rows of ``x`` in rank order (the global batch's); gradients reach each worker's own rows."""
        if self.single:
            return x
        if not x.requires_grad:
            return _all_rows(x)[0]
        return _Gather.apply(x)

    @torch.no_grad()
    def total(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the workers, the same tensor on every one (a statistic each worker took of its own
        slice: the sum is one process's statistic of the whole batch). Not differentiable."""
        if self.single:
            return x
        import torch.distributed as dist

        out = x.detach().clone().contiguous()
        dist.all_reduce(out)
        return out

    @torch.no_grad()
    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The first worker's ``x`` on every worker: what one of them decided (a sample drawn, a matrix computed
        once) is what all of them use."""
        if self.single:
            return x
        import torch.distributed as dist

        out = x.detach().clone().contiguous()
        dist.broadcast(out, src=0)
        return out

    @torch.no_grad()
    def mean_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average every parameter's gradient over the workers, in one all-reduce. A parameter with no gradient (one
        the loss did not reach) has none on any worker, as the graph is the same on all: it stays without, so the
        optimizer skips it as one process's does."""
        if self.single:
            return
        import torch.distributed as dist

        params = [p for p in params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n


SINGLE = Replicas()


def _all_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """all_gather of row blocks that may differ in length between workers (padded to the longest, then cut);
    also each worker's row count."""
    import torch.distributed as dist

    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    rows = [int(c.item()) for c in counts]
    longest = max(rows)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows)]), rows


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        gathered, rows = _all_rows(x)
        rank = dist.get_rank()  # this worker's rows in the gathered tensor come after every lower rank's
        ctx.span = (sum(rows[:rank]), sum(rows[: rank + 1]))
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)  # every worker's copy of the loss sends gradient to every row
        start, stop = ctx.span
        return total[start:stop]
