"""Optimisers and learning-rate schedules for ZipVoice training.

`ScaledAdam` and `Eden` follow upstream (icefall / ZipVoice) so that full fine-tuning behaves as
the released model was trained: each update is scaled by the parameter's own RMS, so every
tensor moves by a similar relative amount. That rule is wrong for LoRA adapters, whose B matrix
starts at zero: its RMS sits at the floor (1e-5) and it barely moves. Adapters therefore train
with AdamW under a linear warm-up and a cosine (or constant) schedule (`WarmupCosine`).

Schedulers share one small interface, `step_batch(batch)` / `step_epoch(epoch)` /
`get_last_lr()` / `state_dict()`, so the trainer drives them all the same way.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

# Elements per fused chunk of ScaledAdam's update on the CPU. Large tensors are cut into flat
# pieces of at most this size, so a chunk's passes (parameter, gradient, two state tensors and
# the denominator: ~5 MiB) run in cache and the denominator is one small reused buffer.
_FOREACH_CHUNK_ELEMENTS = 1 << 18
# On a GPU the cache argument does not hold and every chunk costs one kernel launch per op:
# chunks of 64 MiB per stream, so a released-size model takes a few chunks, not hundreds.
_FOREACH_CHUNK_ELEMENTS_GPU = 1 << 24


# Compiled update (compiled=None: on the CPU for groups of at least _COMPILED_MIN_ELEMENTS):
# each tensor of at least _COMPILED_MIN_TENSOR elements is updated by one inductor-generated loop
# that reads and writes every element of the parameter, gradient and both state tensors once
# (measured on 123 M parameters, 1 thread: 0.14 s against 0.30-0.35 s for the foreach ops,
# which pass over each chunk about ten times). Its compilation takes ~7 s once per process,
# which only a large model repays; smaller tensors stay with the foreach ops.
_COMPILED_MIN_ELEMENTS = 1 << 24
_COMPILED_MIN_TENSOR = 1 << 14

logger = logging.getLogger(__name__)


def _tensor_update(
    p: Tensor,
    grad: Tensor,
    delta: Tensor,
    exp_avg_sq: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    grad_sq_scale: Tensor,
    eps: Tensor,
    alpha: Tensor,
) -> Tensor:
    """The foreach ops' update of one flat tensor in one expression (the scalars are 0-d
    tensors, so that a new learning rate does not recompile); returns sum(p * grad) from
    before the update."""
    dot = torch.dot(p, grad)
    new_exp_avg_sq = exp_avg_sq * beta2 + grad_sq_scale * (grad * grad)
    new_delta = delta * beta1 + alpha * (grad / (new_exp_avg_sq.sqrt() + eps))
    exp_avg_sq.copy_(new_exp_avg_sq)
    delta.copy_(new_delta)
    p.add_(new_delta)
    return dot


@functools.cache
def _compiled_tensor_update(device_type: str) -> Callable[..., Tensor] | None:
    """`_tensor_update` compiled by inductor and tried once on small tensors; None (with a
    warning) where it cannot be built, e.g. without a C++ compiler."""
    kernel = torch.compile(_tensor_update, dynamic=True, fullgraph=True)
    try:
        tensors = [torch.ones(_COMPILED_MIN_TENSOR, device=device_type) for _ in range(4)]
        kernel(*tensors, *_scalars([1.0] * 5, tensors[0]))
    except Exception as error:  # inductor's failures have no common base class
        logger.warning("ScaledAdam: compiled update unavailable (%s); using foreach ops", error)
        return None
    return kernel


def _scalars(values: Iterable[float], like: Tensor) -> list[Tensor]:
    """0-d tensors of like's dtype and device (separate ones: views would add guards)."""
    return [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]


def _flat_alias(tensor: Tensor) -> Tensor:
    """A 1-D tensor on a contiguous tensor's memory that is not a view of it: a view would
    make the compiled update guard on (and recompile for) each shape of its base."""
    flat = tensor.detach().new_empty(0)
    return flat.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _chunk_elements(device: torch.device) -> int:
    return _FOREACH_CHUNK_ELEMENTS if device.type == "cpu" else _FOREACH_CHUNK_ELEMENTS_GPU


def _chunks(pieces: list[tuple], max_elements: int) -> Iterable[list[tuple]]:
    """Consecutive runs of pieces (tuples led by a tensor) holding about max_elements of
    their first tensors (at least one piece each)."""
    chunk: list[tuple] = []
    size = 0
    for piece in pieces:
        numel = piece[0].numel()
        if chunk and size + numel > max_elements:
            yield chunk
            chunk, size = [], 0
        chunk.append(piece)
        size += numel
    if chunk:
        yield chunk


def _flat_pieces(tensor: Tensor, max_elements: int) -> list[Tensor]:
    """Views of a contiguous tensor's elements, in order, each at most max_elements long."""
    flat = tensor.view(-1)
    return [flat[i : i + max_elements] for i in range(0, flat.numel(), max_elements)]


def _clamped_rms(p: Tensor, min_rms: float) -> Tensor:
    """rms(p), at least min_rms, as norm / sqrt(n): one read of p, where (p**2).mean() writes
    and reads a copy of it."""
    return (torch.linalg.vector_norm(p) / math.sqrt(p.numel())).clamp(min=min_rms)


class ScaledAdam(Optimizer):
    """Adam whose step for a tensor is proportional to the tensor's RMS (upstream's ScaledAdam).

    For a non-scalar parameter p the update is `-lr * rms(p) * adam_direction`, with rms clamped to
    [param_min_rms, param_max_rms]; in addition the overall scale of p is learned through the
    gradient of `sum(p * grad)` (every `size_update_period` steps). Scalars use plain Adam with
    `lr * scalar_lr_scale` and are clamped to [-scalar_max, scalar_max]. With `clipping_scale`,
    the whole gradient is clipped to `clipping_scale` times the median norm of recent batches.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-2,
        clipping_scale: float | None = None,
        betas: tuple[float, float] = (0.9, 0.98),
        scalar_lr_scale: float = 0.1,
        eps: float = 1.0e-08,
        param_min_rms: float = 1.0e-05,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_update_period: int = 100,
        foreach: bool = True,
        compiled: bool | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        defaults = dict(
            lr=lr,
            clipping_scale=clipping_scale,
            betas=betas,
            scalar_lr_scale=scalar_lr_scale,
            eps=eps,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            size_update_period=size_update_period,
            clipping_update_period=clipping_update_period,
        )
        super().__init__(params, defaults)
        # Clipping statistics live here rather than in a parameter's state, so that they survive
        # state_dict round trips regardless of parameter order.
        self._recent_norms: list[float] = []
        self._clip_threshold: float | None = None
        self._num_clipped = 0
        self._num_steps = 0
        # foreach=False is the plain per-tensor loop the fused path is tested against.
        self.foreach = foreach
        # compiled: large tensors' update as one compiled loop (None: on the CPU, for large
        # groups; see _COMPILED_MIN_ELEMENTS).
        self.compiled = compiled

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["clipping"] = {
            "recent_norms": torch.tensor(self._recent_norms, dtype=torch.float64),
            "threshold": -1.0 if self._clip_threshold is None else self._clip_threshold,
            "num_steps": self._num_steps,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        clipping = state_dict.pop("clipping", None)
        super().load_state_dict(state_dict)
        if clipping is not None:
            self._recent_norms = [float(x) for x in clipping["recent_norms"].tolist()]
            threshold = float(clipping["threshold"])
            self._clip_threshold = None if threshold < 0 else threshold
            self._num_steps = int(clipping["num_steps"])

    def _weighted_grad_sumsq(self) -> Tensor | None:
        """Sum over tensors of |grad * rms(p)|^2 (the clipping norm squared), or None."""
        sumsq: Tensor | None = None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            fused = [p for p in params if self._fusable(p)]
            if fused:
                # Two reads per tensor and no temporaries: |g * rms|^2 = (|g| * |p| / sqrt(n))^2.
                p_norms = torch.stack(torch._foreach_norm(fused))
                g_norms = torch.stack(torch._foreach_norm([p.grad for p in fused]))
                sizes = torch.tensor([p.numel() for p in fused], dtype=p_norms.dtype)
                rms = (p_norms / sizes.to(p_norms.device).sqrt()).clamp(min=group["param_min_rms"])
                term = ((g_norms * rms) ** 2).sum()
                sumsq = term if sumsq is None else sumsq + term.to(sumsq.device)
            for p in params:
                if self._fusable(p):
                    continue
                grad = p.grad.detach().float()
                if p.numel() > 1:
                    # What matters is the size of the update, which is proportional to the
                    # tensor's rms: weigh its gradient by it.
                    rms = _clamped_rms(p.detach().float(), group["param_min_rms"])
                    grad = grad * rms
                term = (grad**2).sum()
                sumsq = term if sumsq is None else sumsq + term.to(sumsq.device)
        return sumsq

    def _fusable(self, p: Tensor) -> bool:
        """Whether p takes the fused (torch._foreach_*) path: a dense float32/64 tensor."""
        return (
            self.foreach
            and p.numel() > 1
            and p.dtype in (torch.float32, torch.float64)
            and not p.grad.is_sparse
            and p.is_contiguous()
            and p.grad.is_contiguous()
        )

    def _clipping_factor(self) -> float:
        """Factor to multiply all gradients by, from the median of recent total norms."""
        group0 = self.param_groups[0]
        clipping_scale = group0["clipping_scale"]
        if clipping_scale is None:
            return 1.0
        sumsq = self._weighted_grad_sumsq()
        if sumsq is None:
            return 1.0
        total_norm = float(sumsq.sqrt())
        period = group0["clipping_update_period"]
        self._recent_norms.append(total_norm)
        self._recent_norms = self._recent_norms[-period:]
        if self._num_steps % period == 0 or self._clip_threshold is None:
            median = sorted(self._recent_norms)[len(self._recent_norms) // 2]
            self._clip_threshold = clipping_scale * median
        if not math.isfinite(total_norm):
            return 0.0
        if total_norm > self._clip_threshold > 0:
            self._num_clipped += 1
            return self._clip_threshold / total_norm
        return 1.0

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clipping_factor()
        for group in self.param_groups:
            # One fused update per (step, dtype, device): the ops' lists and the shared
            # denominator buffer need one of each.
            fused: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ScaledAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(group, p, state)
                if self._fusable(p):
                    fused.setdefault((state["step"], p.dtype, p.device), []).append(p)
                    continue
                grad = p.grad if clip == 1.0 else p.grad * clip
                if p.numel() == 1:
                    self._step_scalar(group, p, grad, state)
                else:
                    self._step_tensor(group, p, grad, state)
                state["step"] += 1
            for params in fused.values():
                self._step_tensors(group, params, clip)
                for p in params:
                    self.state[p]["step"] += 1
        self._num_steps += 1
        return loss

    @staticmethod
    def _init_state(group: dict, p: Tensor, state: dict) -> None:
        state["step"] = 0
        state["delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() > 1:
            rms = _clamped_rms(p.detach(), group["param_min_rms"])
            state["param_rms"] = rms.reshape(1).to(p.dtype)
            state["scale_exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
            state["scale_grads"] = torch.zeros(
                group["size_update_period"], dtype=p.dtype, device=p.device
            )

    @staticmethod
    def _adam_direction(group: dict, grad: Tensor, state: dict) -> Tensor:
        beta2 = group["betas"][1]
        step = state["step"]
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (step + 1)
        denom = (exp_avg_sq / bias_correction2).sqrt() + group["eps"]
        return grad / denom

    @staticmethod
    def _update_size(group: dict, p: Tensor, state: dict) -> None:
        """Every `size_update_period` steps: refresh rms(p) and, from the accumulated
        d(loss)/d(log scale), add a step on the tensor's overall size to its delta."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        period = group["size_update_period"]
        step = state["step"]
        param_rms = state["param_rms"]
        param_rms.copy_(_clamped_rms(p, group["param_min_rms"]))
        if step == 0:
            return
        scale_grads = state["scale_grads"]
        scale_exp_avg_sq = state["scale_exp_avg_sq"]
        scale_exp_avg_sq.mul_(beta2**period).add_((scale_grads**2).mean(), alpha=1 - beta2**period)
        size_step = (step + 1) // period
        bias_correction2 = 1 - beta2 ** (period * size_step)
        denom = (scale_exp_avg_sq / bias_correction2).sqrt() + group["eps"]
        scale_step = -lr * group.get("scalar_lr_scale", 0.1) * scale_grads.sum() / denom
        too_large = param_rms >= group["param_max_rms"]
        # Past the maximum size, always shrink by a fixed small amount.
        scale_step = torch.where(too_large, torch.full_like(scale_step, -lr * 0.1), scale_step)
        state["delta"].addcmul_(p, scale_step, value=1 - beta1)  # no p-sized temporary

    def _step_tensor(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1 = group["betas"][0]
        period = group["size_update_period"]
        step = state["step"]
        delta = state["delta"]
        # Learn the tensor's overall size: accumulate d(loss)/d(log scale) = sum(p * grad).
        state["scale_grads"][step % period] = (p * grad).sum()
        if step % period == period - 1:
            self._update_size(group, p, state)
        direction = self._adam_direction(group, grad, state)
        alpha = -group["lr"] * (1 - beta1) * state["param_rms"].clamp(min=group["param_min_rms"])
        delta.mul_(beta1).add_(direction * alpha)
        p.add_(delta)

    def _step_tensors(self, group: dict, params: list[Tensor], clip: float) -> None:
        """`_step_tensor` for tensors at the same step, with torch._foreach_* ops over chunks
        of flat pieces (see _FOREACH_CHUNK_ELEMENTS): every element is read from memory about
        once per step and nothing of a tensor's size is allocated; or, for large tensors where
        `compiled` holds, with one compiled loop per tensor (`_tensor_update`). The gradient is
        never scaled in place: the clipping factor goes into the ops' scalars, and the bias
        correction into the step size, sqrt(e / c) + eps = (sqrt(e) + eps sqrt(c)) / sqrt(c)."""
        beta1, beta2 = group["betas"]
        period = group["size_update_period"]
        states = [self.state[p] for p in params]
        step = states[0]["step"]
        slot = step % period
        updates_size = slot == period - 1
        for p, state in zip(params, states, strict=True):
            scale_grads = state["scale_grads"]
            if updates_size:
                # The size step goes into delta before this step's update: it needs the whole
                # sum(p * grad) first.
                scale_grads[slot] = torch.dot(p.view(-1), p.grad.view(-1)) * clip
                self._update_size(group, p, state)
            else:
                scale_grads[slot] = 0.0
        root_correction = math.sqrt(1 - beta2 ** (step + 1))
        rms = torch.cat([state["param_rms"] for state in states])
        alphas = (-group["lr"] * (1 - beta1) * root_correction * clip) * rms.clamp(
            min=group["param_min_rms"]
        )
        kernel = self._compiled_update(params)
        if kernel is not None:
            scalars = _scalars(
                (beta1, beta2, (1 - beta2) * clip * clip, group["eps"] * root_correction),
                params[0],
            )
        chunk_elements = _chunk_elements(params[0].device)
        # One tuple per flat piece: (param, grad, delta, exp_avg_sq, scale_grads, alpha).
        pieces = []
        for p, state, alpha in zip(params, states, alphas.tolist(), strict=True):
            tensors = (p, p.grad, state["delta"], state["exp_avg_sq"])
            if kernel is not None and p.numel() >= _COMPILED_MIN_TENSOR:
                dot = kernel(*(_flat_alias(t) for t in tensors), *scalars, *_scalars([alpha], p))
                if not updates_size:
                    state["scale_grads"][slot].add_(dot, alpha=clip)
                continue
            views = [_flat_pieces(t, chunk_elements) for t in tensors]
            for piece in zip(*views, strict=True):
                pieces.append((*piece, state["scale_grads"], alpha))
        if pieces:
            self._foreach_update(group, pieces, chunk_elements, slot, clip, root_correction)

    @staticmethod
    def _foreach_update(
        group: dict,
        pieces: list[tuple],
        chunk_elements: int,
        slot: int,
        clip: float,
        root_correction: float,
    ) -> None:
        """The update of flat pieces, (param, grad, delta, exp_avg_sq, scale_grads, alpha)
        each, by torch._foreach_* ops over chunks of about chunk_elements, the denominator in
        one reused buffer. Adds each piece's sum(p * grad) into its scale_grads[slot] unless
        this step updates the sizes (which took the whole sums beforehand)."""
        beta1, beta2 = group["betas"]
        updates_size = slot == group["size_update_period"] - 1
        total = sum(piece[0].numel() for piece in pieces)
        buffer = pieces[0][0].new_empty(min(chunk_elements, total))
        for chunk in _chunks(pieces, chunk_elements):
            ps, grads, deltas, exp_avg_sq, scale_grads, chunk_alphas = (
                list(column) for column in zip(*chunk, strict=True)
            )
            if not updates_size:
                for p, grad, sums in zip(ps, grads, scale_grads, strict=True):
                    sums[slot].add_(torch.dot(p, grad), alpha=clip)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=(1 - beta2) * clip * clip)
            denom, offset = [], 0
            for e in exp_avg_sq:
                denom.append(torch.sqrt(e, out=buffer[offset : offset + e.numel()]))
                offset += e.numel()
            torch._foreach_add_(denom, group["eps"] * root_correction)
            torch._foreach_mul_(deltas, beta1)
            torch._foreach_addcdiv_(deltas, grads, denom, chunk_alphas)
            torch._foreach_add_(ps, deltas)

    def _compiled_update(self, params: list[Tensor]) -> Callable[..., Tensor] | None:
        """The compiled update for these tensors, if they take it (see `compiled`)."""
        device = params[0].device
        wanted = self.compiled
        if wanted is None:
            total = sum(p.numel() for p in params)
            wanted = device.type == "cpu" and total >= _COMPILED_MIN_ELEMENTS
        return _compiled_tensor_update(device.type) if wanted else None

    def _step_scalar(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1 = group["betas"][0]
        lr = group["lr"] * group["scalar_lr_scale"]
        direction = self._adam_direction(group, grad, state)
        delta = state["delta"]
        delta.mul_(beta1).add_(direction, alpha=-lr * (1 - beta1))
        p.add_(delta)
        p.clamp_(min=-group["scalar_max"], max=group["scalar_max"])


class LRScheduler:
    """Base for batch/epoch driven schedules: sets each group's lr = base_lr * factor."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.base_lrs = [group["base_lr"] for group in optimizer.param_groups]
        self.epoch = 0.0
        self.batch = 0
        self._last_lr = list(self.base_lrs)
        self._apply()

    def factor(self) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        factor = self.factor()
        self._last_lr = [base * factor for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def step_batch(self, batch: int | None = None) -> None:
        self.batch = self.batch + 1 if batch is None else batch
        self._apply()

    def step_epoch(self, epoch: float | None = None) -> None:
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.epoch = state["epoch"]
        self.batch = state["batch"]
        self._apply()


class Eden(LRScheduler):
    """Upstream's schedule: slow inverse-fourth-root decay in batches and in epochs (or hours).

    lr = base_lr * ((b^2 + B^2) / B^2)^-0.25 * ((e^2 + E^2) / E^2)^-0.25 * warm-up, where the
    warm-up rises linearly from `warmup_start` to 1 over `warmup_batches`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_batches: float,
        lr_epochs: float,
        warmup_batches: float = 500.0,
        warmup_start: float = 0.5,
    ) -> None:
        if lr_batches <= 0 or lr_epochs <= 0:
            raise ValueError(
                f"Eden needs positive lr_batches/lr_epochs, got {lr_batches}/{lr_epochs}"
            )
        self.lr_batches = lr_batches
        self.lr_epochs = lr_epochs
        self.warmup_batches = warmup_batches
        self.warmup_start = warmup_start
        super().__init__(optimizer)

    def factor(self) -> float:
        batch_factor = ((self.batch**2 + self.lr_batches**2) / self.lr_batches**2) ** -0.25
        epoch_factor = ((self.epoch**2 + self.lr_epochs**2) / self.lr_epochs**2) ** -0.25
        if self.warmup_batches > 0 and self.batch < self.warmup_batches:
            warmup = (
                self.warmup_start + (1.0 - self.warmup_start) * self.batch / self.warmup_batches
            )
        else:
            warmup = 1.0
        return batch_factor * epoch_factor * warmup


class FixedLRScheduler(LRScheduler):
    """A constant learning rate (upstream's fine-tuning schedule): the model is already
    trained, so neither Eden's warm-up nor its decay applies."""

    def factor(self) -> float:
        return 1.0


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_ratio` at
    `total_steps`, or constant when `total_steps` is 0 (length of training unknown)."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int = 0,
        min_ratio: float = 0.1,
    ) -> None:
        if warmup_steps < 0 or total_steps < 0:
            raise ValueError("warm-up and total steps must not be negative")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        super().__init__(optimizer)

    def factor(self) -> float:
        step = self.batch
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
