"""The adapter settings of this project, in one typed place (like PEFT's `LoraConfig`).

One name per knob all the way through: the flag is `--lora-<field>` (or `--use-<x>` for the
switches), the field of `LoraSettings` is the knob's name, the adapter folder's
`zipvoice_adapter.json` stores it under `"lora"` with the same name, and a training run's
identity in `run_config.json` under `lora_<field>` (`use_dora`, `use_rslora` as they are).

Importing this module is cheap (no PEFT): entry points read its presets for `--help`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Projections of the attention blocks in every decoder layer: where the accent (timing and pitch
# movements across frames) is learned, and where upstream has plain nn.Linear layers.
ATTENTION_SUFFIXES: tuple[str, ...] = (
    "self_attn_weights.in_proj",
    "self_attn1.in_proj",
    "self_attn1.out_proj",
    "self_attn2.in_proj",
    "self_attn2.out_proj",
)
# The feed-forward and convolution blocks' input projections. Their output projections apply an
# activation first and are not nn.Linear modules, so PEFT cannot wrap them.
FF_CONV_SUFFIXES: tuple[str, ...] = (
    "feed_forward1.in_proj",
    "feed_forward2.in_proj",
    "feed_forward3.in_proj",
    "conv_module1.in_proj",
    "conv_module2.in_proj",
)
PRESETS: dict[str, tuple[str, ...] | None] = {
    "attention": ATTENTION_SUFFIXES,
    "attention_ff_conv": ATTENTION_SUFFIXES + FF_CONV_SUFFIXES,
    "all_linear": None,  # every nn.Linear in the decoder
}
# PEFT initialisations this project accepts. Those in BASE_MUTATING_INITS rewrite the frozen base
# weights (the adapter starts from the weights' principal components), which the adapter folder
# undoes when saving so that adapters always apply to the original checkpoint.
LORA_INITS: tuple[str, ...] = ("default", "gaussian", "pissa", "olora", "orthogonal")
BASE_MUTATING_INITS: tuple[str, ...] = ("pissa", "olora")


def _is_pissa_variant(init: str) -> bool:
    return init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()


def init_mutates_base(init: str) -> bool:
    """Whether PEFT rewrites the base weights when attaching an adapter with this init."""
    return init.startswith(BASE_MUTATING_INITS)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA/DoRA adapters on the flow-matching decoder.

    `target_modules` is a preset name (see PRESETS) or comma-separated module suffixes/names;
    `get_lora_target_modules` resolves it against a model. `validate()` checks the values
    without a model, so that a run fails before any checkpoint is read.
    """

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    use_dora: bool = True
    target_modules: str = "attention"
    init: str = "default"
    use_rslora: bool = False

    def validate(self) -> LoraSettings:
        """Raise ValueError naming the flag of the first bad value; return self."""
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank} (--lora-rank)")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha} (--lora-alpha)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in LORA_INITS and not _is_pissa_variant(self.init):
            raise ValueError(
                f"unknown LoRA init {self.init!r}; choose one of {', '.join(LORA_INITS)} "
                "or pissa_niter_<N>"
            )
        if self.mutates_base_weights and self.use_dora:
            # PEFT cannot convert a PiSSA/OLoRA adapter back onto the original base with DoRA's
            # magnitude vector, so it would only apply to a base this run rewrote.
            raise ValueError(f"LoRA init {self.init!r} cannot be combined with DoRA (--use-dora 0)")
        if not self.target_modules.strip(" ,"):
            raise ValueError(f"empty LoRA target list {self.target_modules!r}")
        return self

    @property
    def mutates_base_weights(self) -> bool:
        return init_mutates_base(self.init)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
