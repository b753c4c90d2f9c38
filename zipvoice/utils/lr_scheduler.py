"""Upstream's `zipvoice.utils.lr_scheduler` names; the schedules live in `zipvoice.utils.optim`.

`LRScheduler` (step_batch / step_epoch / get_last_lr / state_dict), `Eden(optimizer, lr_batches,
lr_epochs, warmup_batches=500.0, warmup_start=0.5)` and `FixedLRScheduler(optimizer)` keep
upstream's constructor arguments and methods.
"""

from zipvoice.utils.optim import Eden, FixedLRScheduler, LRScheduler, WarmupCosine

__all__ = ["Eden", "FixedLRScheduler", "LRScheduler", "WarmupCosine"]
