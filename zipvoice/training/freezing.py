"""Partial freezing from the command line: `--trainable-modules` / `--freeze-modules`.

Both take comma-separated shell-style patterns (`fnmatch`: `*` any run of characters, `?` one
character, `[...]` a set) over the model's parameter names as `model.named_parameters()`
gives them (`fm_decoder.encoders.0.layers.1.self_attn1.in_proj.weight`, `text_encoder...`,
`embed.weight`; with adapters the decoder's names are PEFT's,
`fm_decoder.base_model.model.encoders...`). A pattern names a parameter when it matches the
whole name, or the name of a module that holds it: `fm_decoder.encoders.4` is every parameter
of the last decoder stack, `*.self_attn1.*` every first self-attention.

A parameter trains when the configuration trains it (adapters + embedding with LoRA,
everything in full fine-tuning), it matches some `--trainable-modules` pattern (when given),
and it matches no `--freeze-modules` pattern. This is the Trainer's `trainable` predicate
(zipvoice.training.model_setup), so it only narrows. A pattern that names no parameter of the
model is an error that names it: a typo must not silently train everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from zipvoice.training.config import TrainingError


def split_patterns(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def _names(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


@dataclass(frozen=True)
class ModulePatterns:
    """The `trainable(name)` predicate of the two flags (picklable, for DDP)."""

    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, trainable: str | None, frozen: str | None) -> ModulePatterns | None:
        patterns = cls(split_patterns(trainable), split_patterns(frozen))
        return patterns if patterns.trainable or patterns.frozen else None

    def __call__(self, name: str) -> bool:
        if self.trainable and not any(_names(p, name) for p in self.trainable):
            return False
        return not any(_names(p, name) for p in self.frozen)

    def check_matches(self, names: Iterable[str]) -> None:
        """Every pattern names at least one parameter; otherwise an error naming it."""
        names = list(names)
        for flag, patterns in (
            ("--trainable-modules", self.trainable),
            ("--freeze-modules", self.frozen),
        ):
            for pattern in patterns:
                if not any(_names(pattern, name) for name in names):
                    example = names[0] if names else "?"
                    raise TrainingError(
                        f"{flag} pattern {pattern!r} matches no parameter of the model "
                        f"(names look like {example!r}; patterns are fnmatch globs)"
                    )


def combine(*predicates):
    """One predicate that is True when every given (non-None) predicate is."""
    active = tuple(p for p in predicates if p is not None)
    if not active:
        return None
    if len(active) == 1:
        return active[0]
    return _All(active)


@dataclass(frozen=True)
class _All:
    predicates: tuple

    def __call__(self, name: str) -> bool:
        return all(predicate(name) for predicate in self.predicates)
