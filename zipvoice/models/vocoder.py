"""Vocos-compatible mel vocoder (24 kHz), loadable from the published `charactr/vocos-mel-24khz`.

The `vocos` package imports torchaudio, which cannot be installed here, so the network is
rebuilt from its `config.yaml`. The inverse STFT is written as one `conv_transpose1d` whose
kernel is the windowed inverse-real-FFT basis: that performs the per-frame inverse FFT, the
synthesis window and the overlap-add in a single op that exports to ONNX with a dynamic frame
count (torch.istft and complex tensors do not).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

HUB_REPO = "charactr/vocos-mel-24khz"
CONFIG_NAME = "config.yaml"
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")
IGNORED_PREFIXES = ("feature_extractor.",)
MAX_MAGNITUDE = 100.0


class VocoderLoadError(ValueError):
    """A vocoder folder or file that cannot be turned into a working `Vocos`."""


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> MLP (GELU) -> layer scale, plus residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init_value: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            if layer_scale_init_value > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """Mel (B, input_channels, T) -> hidden (B, T, dim)."""

    def __init__(
        self,
        input_channels: int = 100,
        dim: int = 512,
        intermediate_dim: int = 1536,
        num_layers: int = 8,
        layer_scale_init_value: float | None = None,
        adanorm_num_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        if adanorm_num_embeddings is not None:
            raise VocoderLoadError(
                "adanorm_num_embeddings (the bandwidth-conditioned EnCodec Vocos) is not "
                "supported; use the mel vocoder"
            )
        scale = 1.0 / num_layers if layer_scale_init_value is None else layer_scale_init_value
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, scale) for _ in range(num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.embed(mel)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


def _windowed_irfft_basis(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """Kernel (n_fft + 2, 1, n_fft): rows for the real then imaginary parts of each bin.

    irfft with backward normalisation is x[n] = (1/N) sum_k c_k (Re X_k cos - Im X_k sin)(2 pi k n
    / N), c_k = 1 for DC and Nyquist, 2 otherwise; the imaginary parts of DC and Nyquist drop
    out because their sines vanish at every n, exactly as irfft ignores them.
    """
    n_bins = n_fft // 2 + 1
    k = torch.arange(n_bins, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(n_fft, dtype=torch.float64).unsqueeze(0)
    angle = 2.0 * math.pi * ((k * n) % n_fft) / n_fft
    weight = torch.full((n_bins, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    real_rows = weight * torch.cos(angle) / n_fft
    imag_rows = -weight * torch.sin(angle) / n_fft
    basis = torch.cat([real_rows, imag_rows], dim=0) * window.double().unsqueeze(0)
    return basis.float().unsqueeze(1)


class ISTFTHead(nn.Module):
    """Hidden (B, T, dim) -> waveform (B, T * hop_length) via magnitude/phase and inverse STFT."""

    def __init__(self, dim: int, n_fft: int, hop_length: int, padding: str = "same") -> None:
        super().__init__()
        if padding != "same":
            raise VocoderLoadError(f"ISTFTHead padding {padding!r} is not supported (only 'same')")
        if (n_fft - hop_length) % 2:
            raise VocoderLoadError(f"n_fft - hop_length must be even, got {n_fft}, {hop_length}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.out = nn.Linear(dim, n_fft + 2)
        # Kept under the published key so checkpoints load strictly.
        self.istft = nn.Module()
        self.istft.register_buffer("window", torch.hann_window(n_fft, periodic=True))
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        self.register_buffer(
            "synthesis_kernel", _windowed_irfft_basis(n_fft, window), persistent=False
        )
        self.register_buffer(
            "envelope_kernel", (window**2).float().view(1, 1, n_fft), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.out(x).transpose(1, 2)  # (B, n_fft + 2, T)
        log_mag, phase = spec.chunk(2, dim=1)
        mag = torch.clamp(torch.exp(log_mag), max=MAX_MAGNITUDE)
        parts = torch.cat([mag * torch.cos(phase), mag * torch.sin(phase)], dim=1)
        return self.inverse_stft(parts)

    def inverse_stft(self, parts: torch.Tensor) -> torch.Tensor:
        """Real|imag spectra (B, n_fft + 2, T) -> (B, T * hop), 'same' padding.

        Frames are overlap-added, trimmed by (n_fft - hop) / 2 each side, and divided by the
        overlap-added squared window.
        """
        signal = F.conv_transpose1d(parts, self.synthesis_kernel, stride=self.hop_length)
        ones = torch.ones_like(parts[:1, :1, :])
        envelope = F.conv_transpose1d(ones, self.envelope_kernel, stride=self.hop_length)
        trim = (self.n_fft - self.hop_length) // 2
        end = signal.shape[-1] - trim
        return (signal[:, 0, trim:end] / envelope[:, 0, trim:end]).contiguous()


class Vocos(nn.Module):
    """Mel (B, 100, T) -> 24 kHz waveform (B, T * 256)."""

    def __init__(self, backbone: VocosBackbone, head: ISTFTHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Vocos:
        """Build from the parsed published `config.yaml` (backbone/head `init_args`)."""
        try:
            backbone_args = dict(config["backbone"]["init_args"])
            head_args = dict(config["head"]["init_args"])
        except (KeyError, TypeError) as err:
            raise VocoderLoadError(
                f"vocoder config lacks backbone/head init_args ({err!r})"
            ) from err
        for part, section in (("backbone", "VocosBackbone"), ("head", "ISTFTHead")):
            class_path = str(config[part].get("class_path", section))
            if not class_path.endswith(section):
                raise VocoderLoadError(f"unsupported vocoder {part} {class_path!r}")
        try:
            return cls(VocosBackbone(**backbone_args), ISTFTHead(**head_args))
        except TypeError as err:
            raise VocoderLoadError(f"bad vocoder config arguments: {err}") from err

    @classmethod
    def from_config_file(cls, path: str | Path) -> Vocos:
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise VocoderLoadError(f"cannot read vocoder config {path}: {err}") from err
        if not isinstance(config, dict):
            raise VocoderLoadError(f"vocoder config {path} is not a YAML mapping")
        try:
            return cls.from_config(config)
        except VocoderLoadError as err:
            raise VocoderLoadError(f"{path}: {err}") from err

    def load_weights(self, path: str | Path) -> None:
        """Load `pytorch_model.bin` or `.safetensors`; `feature_extractor.*` are ignored."""
        path = Path(path)
        state = _read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        if wrong_shape:
            problems.append(f"shape mismatches {wrong_shape[:5]}")
        if problems:
            raise VocoderLoadError(
                f"{path} does not match the vocoder config: " + "; ".join(problems)
            )
        self.load_state_dict(state, strict=True)

    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel (B, n_mels, T) -> waveform (B, T * hop_length)."""
        if mel.ndim != 3:
            raise ValueError(f"Vocos.decode expects mel (batch, n_mels, frames), got {mel.shape}")
        return self.head(self.backbone(mel))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode(mel)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # corrupt or foreign file: say which one
        raise VocoderLoadError(f"cannot read vocoder weights {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VocoderLoadError(f"{path} is not a vocoder state dict")
    return state


def _build(config_path: Path, weights_path: Path) -> Vocos:
    vocoder = Vocos.from_config_file(config_path)
    vocoder.load_weights(weights_path)
    return vocoder.eval()


def load_vocoder(path: str | Path | None = None, repo_id: str = HUB_REPO) -> nn.Module:
    """A ready (eval-mode) vocoder from a local folder, or from the hub when `path` is None
    (the hub cache first; offline, an immediate error naming the file and the alternatives).

    The folder holds `config.yaml` and `pytorch_model.bin` or `model.safetensors`. The name
    "griffin-lim" gives the training-free `GriffinLimVocoder` (offline demos, tiny models).
    """
    from zipvoice.models.griffin_lim import GRIFFIN_LIM_NAME, GriffinLimVocoder

    if path is not None and str(path) == GRIFFIN_LIM_NAME:
        return GriffinLimVocoder().eval()
    if path is None:
        from zipvoice.utils.hub import hub_files

        instead = (
            f"download {CONFIG_NAME} and {WEIGHT_NAMES[0]} of {repo_id} into one folder and "
            f"pass it as --vocoder-path, or use --vocoder-path {GRIFFIN_LIM_NAME} (no download, "
            "lower quality)"
        )
        config_path, weights_path = hub_files(
            repo_id, [CONFIG_NAME, WEIGHT_NAMES[0]], instead=instead
        )
        return _build(config_path, weights_path)

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"vocoder folder {folder} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"vocoder folder {folder} has no {CONFIG_NAME}")
    weights_path = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights_path is None:
        raise FileNotFoundError(
            f"vocoder folder {folder} has no weights file ({' or '.join(WEIGHT_NAMES)})"
        )
    return _build(config_path, weights_path)
