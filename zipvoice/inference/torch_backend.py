"""The PyTorch backend: a released model (plus an adapter folder) loaded for inference, and
the sample/vocode functions the generation pipeline calls."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zipvoice.inference.generation import SampleFn, VocodeFn
from zipvoice.models.modules.fastpath import OneDnnLinears, onednn_linear_available

logger = logging.getLogger(__name__)


def model_kind(model: nn.Module) -> str:
    from zipvoice.models.zipvoice_distill import ZipVoiceDistill

    return "zipvoice_distill" if isinstance(model, ZipVoiceDistill) else "zipvoice"


def load_base_model(
    model_name: str,
    model_dir: str | Path | None,
    checkpoint_name: str,
    token_file: str | Path | None,
) -> tuple[nn.Module, Path, Path, str]:
    """A released model in eval mode, read from disk once (`models.loader.load_released`).

    Returns (model, token file, checkpoint path, fingerprint of the checkpoint's state dict);
    the fingerprint is computed from the same tensors the model was loaded from, so checking
    an adapter against it costs no second read of model.pt.
    """
    from zipvoice.models.loader import load_released

    loaded = load_released(model_name, model_dir, checkpoint_name, token_file, fingerprint=True)
    return loaded.model, loaded.token_file, loaded.checkpoint, str(loaded.fingerprint)


def load_model_for_inference(
    model_name: str = "zipvoice",
    model_dir: str | Path | None = None,
    checkpoint_name: str = "model.pt",
    lora_path: str | Path | None = None,
    lora_scale: float = 1.0,
    merge_lora: bool = True,
    token_file: str | Path | None = None,
    lora_t_range: tuple[float, float] | None = None,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Load a released model, optionally apply an adapter folder (fingerprint-checked).

    Returns (eval-mode model, token file to use, adapter metadata or {}). With an adapter the
    adapter's own tokens.txt is used (it may extend the vocabulary), unless ``token_file`` is
    given. ``lora_t_range`` (A, B) gates the decoder adapter to flow times A <= t < B
    (`zipvoice.models.modules.time_gate`); the gate is then ``model.time_gate``.
    """
    from zipvoice.models.modules.adapter_folder import TOKENS_FILE, load_adapter, read_adapter_meta

    meta: dict[str, Any] = {}
    if lora_path is not None:
        meta = read_adapter_meta(lora_path)  # fail on a broken folder before the big load
        if token_file is None and (Path(lora_path) / TOKENS_FILE).is_file():
            token_file = Path(lora_path) / TOKENS_FILE
    # With an adapter the base loads with its own vocabulary; the adapter grows the embedding.
    model, token_path, checkpoint_path, fingerprint = load_base_model(
        model_name, model_dir, checkpoint_name, None if lora_path else token_file
    )
    if model_kind(model) != model_name:
        logger.warning(
            "--model-name is %s but %s holds a %s model; using the checkpoint's",
            model_name,
            checkpoint_path,
            model_kind(model),
        )
    if lora_t_range is not None and lora_path is None:
        raise ValueError("--lora-t-range gates an adapter: give --lora-path too")
    if lora_path is not None:
        base_weights: dict[str, torch.Tensor] | None = {} if lora_t_range and merge_lora else None
        model = load_adapter(
            model,
            lora_path,
            base_state_dict_fingerprint=fingerprint,
            scale=lora_scale,
            merge=merge_lora,
            base_weights=base_weights,
        )
        if token_file is not None:
            token_path = Path(token_file)
        if lora_t_range is not None:
            from zipvoice.models.modules.time_gate import TimeGate

            model.time_gate = TimeGate(model.fm_decoder, base_weights, lora_t_range)
    from zipvoice.tokenizer.token_file import check_tokens_fit_embedding

    source = lora_path if lora_path is not None else checkpoint_path
    check_tokens_fit_embedding(token_path, int(model.embed.weight.shape[0]), source)
    model.eval()
    return model, token_path, meta


def compile_decoder(model: nn.Module) -> nn.Module:
    """Compile the flow-matching decoder in place with `torch.compile` (inductor).

    The decoder is the only part that runs once per Euler step, so it is the part worth
    compiling; the module keeps its identity and state-dict keys (`nn.Module.compile`). Under
    compilation the modules take their plain, exportable paths (`scaling.is_exporting`), which
    inductor fuses; tests/test_compile.py pins compiled against eager outputs. The first call
    per input shape pays the compilation (minutes for the released model on a small CPU;
    docs/benchmarks.md has the measured warm-up), which is why `--compile` is off by default.
    """
    if getattr(model, "time_gate", None) is not None:
        raise ValueError("--compile does not combine with --lora-t-range (weights swap per step)")
    model.fm_decoder.compile()
    return model


def fast_linears(
    module: nn.Module, device: torch.device | str
) -> contextlib.AbstractContextManager:
    """`OneDnnLinears` for a CPU module that is not compiled (inductor chooses its own
    kernels, and traces Python modes poorly), else nothing."""
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
    if torch.device(device).type == "cpu" and not compiled and onednn_linear_available():
        return OneDnnLinears()
    return contextlib.nullcontext()


def torch_sampler(
    model: nn.Module,
    num_step: int,
    guidance_scale: float,
    t_shift: float = 0.5,
    speed: float = 1.0,
    device: torch.device | str = "cpu",
) -> SampleFn:
    """A SampleFn running ``model.sample`` on one batch of chunks sharing one prompt."""

    @torch.inference_mode()
    def sample(batch: list[list[int]], prompt_ids: list[int], prompt_features: np.ndarray):
        n = len(batch)
        features = torch.from_numpy(prompt_features).to(device).unsqueeze(0).repeat(n, 1, 1)
        lens = torch.full((n,), features.size(1), dtype=torch.int64, device=device)
        with fast_linears(model, device):
            pred, pred_lens, _, _ = model.sample(
                tokens=batch,
                prompt_tokens=[list(prompt_ids)] * n,
                prompt_features=features,
                prompt_features_lens=lens,
                speed=speed,
                t_shift=t_shift,
                duration="predict",
                num_step=num_step,
                guidance_scale=guidance_scale,
            )
        return [pred[i, : int(pred_lens[i])].T.float().cpu().numpy() for i in range(n)]

    return sample


def torch_vocoder(vocoder: nn.Module, device: torch.device | str = "cpu") -> VocodeFn:
    @torch.inference_mode()
    def vocode(mel: np.ndarray) -> np.ndarray:
        with fast_linears(vocoder, device):
            wave = vocoder.decode(torch.from_numpy(np.ascontiguousarray(mel)).to(device)[None])
        return wave[0].float().cpu().numpy()

    return vocode
