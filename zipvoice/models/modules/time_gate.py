"""Time-gated adapters: the adapter acts only on some flow times of the sampling ODE.

In flow matching the early steps (t near 0) lay out coarse structure (durations, the pitch
contour) and the late steps fine spectral detail (timbre). An accent adapter applied only on
the early steps can change the prosody while the base model keeps drawing the voice.

Which time a step uses: an Euler step from t_k to t_{k+1} evaluates the velocity once, at its
start time t_k, taken after the t-shift (`get_time_steps`: s*t / (1 + (s-1)*t)). That t_k is
the `t` the decoder receives, and the step runs with the adapter iff

    A <= t_k < B        (half-open, so that "0,0.5" and "0.5,1" split the steps between them)

Start times are always below 1, so "0,1" is the full adapter on every step and "A,A" (an
empty range) the base decoder on every step. Classifier-free guidance runs the conditional
and unconditional halves in one call, so both halves of a step use the same weights.

The gate holds two weight tensors per adapted module, the base ones and the merged ones, and
swaps them (a dict assignment per module) only when consecutive decoder calls fall on
different sides of the range boundary; nothing is merged or copied per step. For an unmerged
PEFT decoder it switches PEFT's adapter layers on and off instead. The text side of an
adapter (embedding, text encoder) runs once before the ODE and is not gated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class TimeGateError(ValueError):
    """A time range that cannot gate an adapter (bad bounds, mixed times in one batch)."""


def parse_t_range(text: str) -> tuple[float, float]:
    """'A,B' -> (A, B) with 0 <= A <= B <= 1, for the --lora-t-range flag."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise TimeGateError(
            f"--lora-t-range must be two numbers 'A,B' (e.g. 0,0.5), got {text!r}"
        ) from None
    return check_t_range((start, end))


def check_t_range(t_range: tuple[float, float]) -> tuple[float, float]:
    start, end = (float(v) for v in t_range)
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise TimeGateError(f"--lora-t-range needs 0 <= A <= B <= 1, got {start:g},{end:g}")
    return start, end


def in_t_range(t: float, t_range: tuple[float, float]) -> bool:
    """Whether a step starting at flow time t uses the adapter (A <= t < B)."""
    return t_range[0] <= t < t_range[1]


def step_time(t: Any) -> float:
    """The single flow time of one decoder call; a batch mixing times cannot be gated."""
    if not torch.is_tensor(t):
        return float(t)
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        raise TimeGateError("empty time tensor")
    first = flat[0]
    if flat.numel() > 1 and not bool((flat == first).all()):
        raise TimeGateError(
            "a time-gated decoder needs one flow time per call (sampling), got several"
        )
    return float(first)


class TimeGate:
    """Applies a merged adapter to `decoder` only for flow times in [A, B).

    `base_weights` maps decoder-relative module names to the base weights of the adapted
    modules (taken before merging); the decoder itself holds the merged weights. Attach with
    `TimeGate(decoder, base_weights, t_range)`; `remove()` detaches and leaves the merged
    weights installed. For an unmerged PEFT decoder pass `base_weights=None`.
    """

    def __init__(
        self,
        decoder: nn.Module,
        base_weights: Mapping[str, Tensor] | None,
        t_range: tuple[float, float],
    ) -> None:
        self.decoder = decoder
        self.t_range = check_t_range(t_range)
        self.adapted = True  # merged weights / enabled adapters are installed now
        self.switches = 0
        self._held = False
        modules = dict(decoder.named_modules())
        self._slots: list[tuple[nn.Module, nn.Parameter]] = []
        if base_weights is not None:
            for name, weight in base_weights.items():
                module = modules.get(name)
                if module is None or not isinstance(getattr(module, "weight", None), Tensor):
                    raise TimeGateError(f"the decoder has no weight for adapted module {name!r}")
                if tuple(module.weight.shape) != tuple(weight.shape):
                    raise TimeGateError(f"base weight of {name} has another shape")
                other = nn.Parameter(weight.detach(), requires_grad=False)
                self._slots.append((module, other))
        elif not hasattr(decoder, "disable_adapter_layers"):
            raise TimeGateError("an unmerged decoder must be a PEFT model to be gated")
        self._handle = decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def use_adapter(self, adapted: bool) -> None:
        """Install the merged (True) or base (False) weights; no-op if already installed."""
        if adapted == self.adapted:
            return
        if self._slots:
            for i, (module, other) in enumerate(self._slots):
                current = module._parameters["weight"]
                if other.device != current.device or other.dtype != current.dtype:
                    other = nn.Parameter(other.data.to(current), requires_grad=False)
                module._parameters["weight"] = other
                self._slots[i] = (module, current)
        elif adapted:
            self.decoder.enable_adapter_layers()
        else:
            self.decoder.disable_adapter_layers()
        self.adapted = adapted
        self.switches += 1

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._held:
            return
        t = kwargs["t"] if "t" in kwargs else args[1]
        self.use_adapter(in_t_range(step_time(t), self.t_range))

    @contextmanager
    def hold(self, adapted: bool) -> Iterator[None]:
        """Run with one weight set whatever t is (e.g. to export each decoder on its own)."""
        previous = self._held
        self.use_adapter(adapted)
        self._held = True
        try:
            yield
        finally:
            self._held = previous

    def remove(self) -> None:
        """Detach the gate, leaving the merged weights (or enabled adapters) installed."""
        self.use_adapter(True)
        self._handle.remove()
