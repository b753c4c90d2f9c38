"""The training sampler's position as of the last batch training consumed, for checkpoints.

A DataLoader with workers draws batches from its sampler ahead of training (prefetch: up to
`prefetch_factor * num_workers` batches as soon as an iterator starts), so
`sampler.state_dict()` at save time describes batches nobody trained on yet. Saving it makes a
resumed run skip them. lhotse's samplers restore in different units (DynamicBucketingSampler
replays the epoch's batch count, SimpleCutSampler skips the epoch's cut count), so patching a
count after the fact is right for one sampler and wrong for another.

`SamplerPosition` instead records the sampler's own complete state right after it yields each
batch (a lhotse `map` transform, which runs where the sampler runs: in the training process, for
a map-style dataset whatever the worker count) and hands them out in the order the loader
returns batches. The state saved after N consumed batches is exactly the state a loader without
workers would have had: resume does not depend on prefetch, the worker count or timing.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # lhotse is imported by whoever builds the sampler
    from lhotse.dataset.sampling.base import CutSampler


class SamplerPosition:
    """Follows `sampler` (any lhotse CutSampler, a ZipSampler included): call `restart()` before
    each new iterator over the loader, `consumed()` once per batch training takes from it, and
    `state_dict()` for the checkpoint."""

    def __init__(self, sampler: CutSampler) -> None:
        self.sampler = sampler
        self._pending: deque[dict[str, Any]] = deque()
        self._current: dict[str, Any] | None = None
        sampler.map(self._record)

    def _record(self, batch: Any) -> Any:
        # Called by the sampler after it counted `batch` in its diagnostics, before it yields it.
        self._pending.append(copy.deepcopy(self.sampler.state_dict()))
        return batch

    def restart(self) -> None:
        """A new iterator over the loader begins: batches prefetched by the previous one are
        dropped, never trained on, so their states are too."""
        self._pending.clear()

    def consumed(self) -> None:
        """Training took the next batch from the loader."""
        if not self._pending:
            raise RuntimeError(
                "a batch arrived that its sampler did not yield through SamplerPosition "
                "(was restart() called before the loader's iterator started?)"
            )
        self._current = self._pending.popleft()

    @property
    def ahead(self) -> int:
        """Batches the sampler has yielded that training has not consumed yet (prefetch)."""
        return len(self._pending)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the last consumed batch (before any batch: its state
        now, which then has nothing prefetched beyond what was restored)."""
        if self._current is None:
            return copy.deepcopy(self.sampler.state_dict())
        return copy.deepcopy(self._current)
