"""Export ZipVoice to ONNX: a text encoder, a flow-matching decoder and optionally the vocoder.

The split follows upstream: `text_encoder.onnx` turns (tokens, prompt tokens, prompt frame
count, speed) into the frame-level text condition; `fm_decoder.onnx` is the velocity network
v(t, x, text_condition, speech_condition). Sampling (Euler + classifier-free guidance) stays
in the caller (numpy), so one decoder graph serves every step count and guidance scale.

Adapters must be merged first: the graphs then hold plain weights and run at the base model's
cost. The TorchScript exporter (`dynamo=False`) is the default: it handles the decoder's
dynamic batch and time axes correctly and exports in seconds; `exporter="dynamo"` uses
torch.export (about ten times slower here, same results).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from zipvoice.models.modules.lora_utils import is_lora_model
from zipvoice.models.zipvoice import get_tokens_index
from zipvoice.onnx import EXPORTERS
from zipvoice.utils.fileio import atomic_copy, atomic_write
from zipvoice.utils.manifest import write_manifest

logger = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT_VERSION = "1"
TEXT_ENCODER_FILE = "text_encoder.onnx"
FM_DECODER_FILE = "fm_decoder.onnx"
VOCODER_FILE = "vocoder.onnx"
TOKENS_FILE = "tokens.txt"


class OnnxExportError(ValueError):
    """A model that cannot be exported as asked (e.g. adapters not merged)."""


class OnnxTextEncoder(nn.Module):
    """tokens (N, S), prompt_tokens (N, P), prompt_features_len (), speed () ->
    text_condition (N, T, feat_dim) with T = prompt_len + ceil(prompt_len / P * S / speed).

    All rows of a batch share lengths (one prompt, equal-length texts), as upstream's graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed = model.embed
        self.text_encoder = model.text_encoder
        self.pad_id = int(model.pad_id)

    def forward(
        self, tokens: Tensor, prompt_tokens: Tensor, prompt_features_len: Tensor, speed: Tensor
    ) -> Tensor:
        cat_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        batch, num_tokens = cat_tokens.shape
        cat_tokens = nn.functional.pad(cat_tokens, (0, 1), value=self.pad_id)
        positions = torch.arange(num_tokens + 1, device=tokens.device)
        padding_mask = (positions == num_tokens).unsqueeze(0).expand(batch, -1)
        embed = self.text_encoder(x=self.embed(cat_tokens), t=None, padding_mask=padding_mask)

        prompt_len = prompt_features_len.reshape(1).to(torch.int64)
        ratio = prompt_len.to(torch.float32) / prompt_tokens.shape[1]
        text_len = torch.ceil(ratio * tokens.shape[1] / speed.reshape(1).to(torch.float32))
        features_len = prompt_len + text_len.to(torch.int64)
        tokens_len = torch.full_like(features_len, num_tokens)
        index = get_tokens_index(features_len, tokens_len, features_len.reshape(()))
        index = index.expand(batch, -1).unsqueeze(-1).expand(-1, -1, embed.shape[-1])
        return torch.gather(embed, dim=1, index=index)


class OnnxFmDecoder(nn.Module):
    """t (N,), x, text_condition, speech_condition (N, T, F), padding_mask (N, T) bool
    [, guidance_scale (N,) for the distilled model] -> velocity (N, T, F)."""

    def __init__(self, model: nn.Module, distill: bool) -> None:
        super().__init__()
        self.model = model
        self.distill = distill

    def forward(
        self,
        t: Tensor,
        x: Tensor,
        text_condition: Tensor,
        speech_condition: Tensor,
        padding_mask: Tensor,
        guidance_scale: Tensor | None = None,
    ) -> Tensor:
        return self.model.forward_fm_decoder(
            t=t.reshape(-1, 1, 1),
            xt=x,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
            guidance_scale=None if guidance_scale is None else guidance_scale.reshape(-1, 1, 1),
        )


class OnnxVocoder(nn.Module):
    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel: Tensor) -> Tensor:
        return self.vocoder.decode(mel)


def add_metadata(path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Store key/value strings in the model's metadata_props (replacing equal keys)."""
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key = str(key)
        prop.value = value if isinstance(value, str) else json.dumps(value)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def read_metadata(path: str | Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    exporter: str,
) -> None:
    """Export to a temp file beside `path` and check it before it replaces `path`."""
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    module.eval()

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            if exporter == "torchscript":
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
            else:
                dims: dict[str, torch.export.Dim] = {}
                shapes = []
                for name in input_names:
                    axes = dynamic_axes.get(name, {})
                    shapes.append(
                        {
                            a: dims.setdefault(label, torch.export.Dim(label))
                            for a, label in axes.items()
                        }
                    )
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=max(OPSET, 18),
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=tuple(shapes),
                )
                program.save(str(tmp))
        module.eval()  # the TorchScript exporter restores the wrapper's mode on the way out
        onnx.checker.check_model(str(tmp))

    atomic_write(path, write)


def export_text_encoder(model: nn.Module, path: str | Path, exporter: str = "torchscript") -> Path:
    path = Path(path)
    # Batch 2: torch.export would specialise a size-1 batch to a constant.
    args = (
        torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]], dtype=torch.int64),
        torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int64),
        torch.tensor(40, dtype=torch.int64),
        torch.tensor(1.0, dtype=torch.float32),
    )
    _export(
        OnnxTextEncoder(model),
        args,
        path,
        ["tokens", "prompt_tokens", "prompt_features_len", "speed"],
        ["text_condition"],
        {
            "tokens": {0: "N", 1: "S"},
            "prompt_tokens": {0: "N", 1: "P"},
            "text_condition": {0: "N", 1: "T"},
        },
        exporter,
    )
    return path


def export_fm_decoder(
    model: nn.Module, path: str | Path, distill: bool, exporter: str = "torchscript"
) -> Path:
    path = Path(path)
    feat_dim = int(model.feat_dim)
    batch, frames = 2, 53
    args: tuple[Tensor, ...] = (
        torch.tensor([0.3, 0.7]),
        torch.randn(batch, frames, feat_dim),
        torch.randn(batch, frames, feat_dim),
        torch.randn(batch, frames, feat_dim),
        torch.zeros(batch, frames, dtype=torch.bool),
    )
    names = ["t", "x", "text_condition", "speech_condition", "padding_mask"]
    axes: dict[str, dict[int, str]] = {
        "t": {0: "N"},
        "x": {0: "N", 1: "T"},
        "text_condition": {0: "N", 1: "T"},
        "speech_condition": {0: "N", 1: "T"},
        "padding_mask": {0: "N", 1: "T"},
        "v": {0: "N", 1: "T"},
    }
    if distill:
        args = args + (torch.tensor([3.0, 2.0]),)
        names.append("guidance_scale")
        axes["guidance_scale"] = {0: "N"}
    _export(OnnxFmDecoder(model, distill), args, path, names, ["v"], axes, exporter)
    return path


def export_vocoder(vocoder: nn.Module, path: str | Path, exporter: str = "torchscript") -> Path:
    path = Path(path)
    n_mels = int(vocoder.backbone.embed.in_channels)
    _export(
        OnnxVocoder(vocoder),
        (torch.randn(2, n_mels, 37),),
        path,
        ["mel"],
        ["wave"],
        {"mel": {0: "N", 2: "T"}, "wave": {0: "N", 1: "S"}},
        exporter,
    )
    return path


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm nodes (activations stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)

    def write(tmp: Path) -> None:
        quantize_dynamic(
            model_input=str(src),
            model_output=str(tmp),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
        )
        add_metadata(tmp, {**read_metadata(src), "quantization": "int8-dynamic"})

    atomic_write(dst, write)
    return dst


def export_metadata(
    tokenizer: str,
    lang: str,
    checkpoint_name: str,
    lora_path: str | Path | None = None,
    lora_scale: float = 1.0,
    adapter_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an export records beyond the model itself: the text front end the runtime uses,
    and which checkpoint and merged adapter it came from (provenance for whoever ships it)."""
    metadata: dict[str, Any] = {
        "tokenizer": tokenizer,
        "lang": lang,
        "checkpoint": Path(checkpoint_name).name,
    }
    if lora_path is not None:
        adapter_meta = adapter_meta or {}
        metadata.update(
            {
                "lora_merged": "1",
                "lora_scale": str(lora_scale),
                "lora_base_fingerprint": str(adapter_meta.get("base_fingerprint", "")),
                "lora": adapter_meta.get("lora", {}),
            }
        )
    return metadata


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    token_file: str | Path,
    metadata: Mapping[str, Any] | None = None,
    int8: bool = False,
    vocoder: nn.Module | None = None,
    exporter: str = "torchscript",
) -> dict[str, Path]:
    """Write text_encoder.onnx, fm_decoder.onnx (+ *_int8.onnx, vocoder.onnx) and tokens.txt.

    Refuses a model whose decoder still carries unmerged PEFT adapters: their extra matmuls
    would cost inference time and the graph would depend on PEFT's module layout.
    """
    from zipvoice.models.zipvoice_distill import ZipVoiceDistill

    if is_lora_model(model):
        raise OnnxExportError(
            "the model carries unmerged LoRA/DoRA adapters; merge them first "
            "(load_adapter(..., merge=True) or merge_lora_weights) so the exported graph "
            "holds plain weights"
        )
    distill = isinstance(model, ZipVoiceDistill)
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "zipvoice_distill" if distill else "zipvoice"
    # What the runtime reads (model_type, feat_dim; tokenizer and lang from `metadata`), plus
    # the format version and the output rate, which describe the files to any other reader.
    meta: dict[str, Any] = {
        "version": EXPORT_FORMAT_VERSION,
        "model_type": kind,
        "feat_dim": str(model.feat_dim),
        "sample_rate": "24000",
    }
    meta.update(
        {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    )

    written: dict[str, Path] = {}
    written["text_encoder"] = export_text_encoder(model, out_dir / TEXT_ENCODER_FILE, exporter)
    add_metadata(written["text_encoder"], {**meta, "comment": "ZipVoice text encoder"})
    written["fm_decoder"] = export_fm_decoder(model, out_dir / FM_DECODER_FILE, distill, exporter)
    add_metadata(written["fm_decoder"], {**meta, "comment": "ZipVoice flow-matching decoder"})
    if int8:
        for key, name in (("text_encoder", TEXT_ENCODER_FILE), ("fm_decoder", FM_DECODER_FILE)):
            written[f"{key}_int8"] = quantize_int8(
                written[key], out_dir / name.replace(".onnx", "_int8.onnx")
            )
    if vocoder is not None:
        written["vocoder"] = export_vocoder(vocoder.eval(), out_dir / VOCODER_FILE, exporter)
        add_metadata(written["vocoder"], {"comment": "Vocos mel vocoder", "sample_rate": "24000"})
    if Path(token_file).resolve() != (out_dir / TOKENS_FILE).resolve():
        atomic_copy(token_file, out_dir / TOKENS_FILE)
    written["tokens"] = out_dir / TOKENS_FILE
    from zipvoice.models.modules.adapter_folder import fingerprint_state_dict

    base = meta.get("lora_base_fingerprint") or fingerprint_state_dict(model.state_dict())
    write_manifest(out_dir, "onnx", base_fingerprint=base, files=written.values())
    return written
