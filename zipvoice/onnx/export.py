"""Export ZipVoice to ONNX in upstream ZipVoice's file contract, with adapters merged in.

The folder is what upstream's ONNX inference and sherpa-onnx read (docs/lora.md, "ONNX"):
`text_encoder.onnx` (tokens, prompt_tokens, prompt_features_len, speed -> text_condition),
`fm_decoder.onnx` (t, x, text_condition, speech_condition, guidance_scale -> v, with
classifier-free guidance inside the graph), their dynamic-int8 copies `*_int8.onnx`,
`model.json` and `tokens.txt`, at opset 13 with upstream's metadata keys. This project adds,
without changing those files' contract: `fm_decoder_base.onnx` (+ int8) for time-gated
adapters (the base decoder, run by this project's runtime on the steps outside the range;
upstream's tools ignore it and run the full adapter), `vocoder.onnx` on request, extra
metadata keys (model type, tokenizer, adapter provenance) and the folder manifest.

Adapters must be merged first: the graphs then hold plain weights and run at the base model's
cost. The TorchScript exporter (`dynamo=False`) is the default; `exporter="dynamo"` uses
torch.export, which needs opset 18 (outside upstream's opset 13; onnxruntime reads both).
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
from zipvoice.onnx.optimize import fuse_bias_gemm
from zipvoice.utils.cli import quiet_info_logs
from zipvoice.utils.fileio import atomic_copy, atomic_write, atomic_write_json
from zipvoice.utils.manifest import write_manifest

logger = logging.getLogger(__name__)

OPSET = 13  # upstream's
EXPORT_FORMAT_VERSION = "1"
TEXT_ENCODER_FILE = "text_encoder.onnx"
FM_DECODER_FILE = "fm_decoder.onnx"
FM_DECODER_BASE_FILE = "fm_decoder_base.onnx"  # time gating: the decoder without the adapter
VOCODER_FILE = "vocoder.onnx"
TOKENS_FILE = "tokens.txt"
MODEL_CONFIG_FILE = "model.json"
# The graph contract (names in order); tests check the files against these.
TEXT_ENCODER_INPUTS = ("tokens", "prompt_tokens", "prompt_features_len", "speed")
TEXT_ENCODER_OUTPUTS = ("text_condition",)
FM_DECODER_INPUTS = ("t", "x", "text_condition", "speech_condition", "guidance_scale")
FM_DECODER_OUTPUTS = ("v",)
AUDIO_METADATA = {
    "sample_rate": "24000",
    "n_fft": "1024",
    "hop_length": "256",
    "window_length": "1024",
    "num_mels": "100",
}


class OnnxExportError(ValueError):
    """A model that cannot be exported as asked (e.g. adapters not merged)."""


class OnnxTextEncoder(nn.Module):
    """Upstream's text encoder graph: tokens (N, S), prompt_tokens (N, P), prompt_features_len
    (), speed () -> text_condition (N, F, feat_dim), prompt region included.

    F = ceil(prompt_features_len / P * (P + S) / speed): the prompt's frames-per-token rate
    applied to all P + S tokens (at speed 1 this equals PyTorch's prompt_len + ceil(...) for
    the text alone; at other speeds upstream's ONNX scales the prompt region too). Every token
    gets floor(F / (P + S)) frames and the appended pad position fills the rest.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed = model.embed
        self.text_encoder = model.text_encoder
        self.pad_id = int(model.pad_id)
        self.feat_dim = int(model.feat_dim)

    def forward(
        self, tokens: Tensor, prompt_tokens: Tensor, prompt_features_len: Tensor, speed: Tensor
    ) -> Tensor:
        cat_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        batch, num_tokens = cat_tokens.shape
        cat_tokens = nn.functional.pad(cat_tokens, (0, 1), value=self.pad_id)
        positions = torch.arange(num_tokens + 1, device=tokens.device)
        padding_mask = (positions == num_tokens).unsqueeze(0).expand(batch, -1)
        embed = self.text_encoder(x=self.embed(cat_tokens), t=None, padding_mask=padding_mask)

        prompt_len = prompt_features_len.reshape(1).to(torch.float32)
        rate = prompt_len / prompt_tokens.shape[1]
        features_len = torch.ceil(rate * num_tokens / speed.reshape(1).to(torch.float32))
        features_len = features_len.to(torch.int64)
        tokens_len = torch.full_like(features_len, num_tokens)
        index = get_tokens_index(features_len, tokens_len, features_len.reshape(()))
        index = index.expand(batch, -1).unsqueeze(-1).expand(-1, -1, self.feat_dim)
        return torch.gather(embed, dim=1, index=index)


class OnnxFmDecoder(nn.Module):
    """Upstream's decoder graph: t (), x, text_condition, speech_condition (N, F, feat_dim),
    guidance_scale () -> v (N, F, feat_dim); no padding mask (one length per batch).

    ZipVoice: classifier-free guidance inside the graph. The batch is doubled: the
    unconditional half has no text condition, and no speech condition either when t > 0.5;
    the scale is g for t > 0.5 and 2g otherwise; v = (1 + g) v_cond - g v_uncond. The branch
    is a `where` on t, so one graph serves every step. ZipVoice-Distill: g goes to the
    guidance-scale embedding and the batch is not doubled.
    """

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
        guidance_scale: Tensor,
    ) -> Tensor:
        if self.distill:
            return self.model.forward_fm_decoder(
                t=t, xt=x, text_condition=text_condition, speech_condition=speech_condition,
                guidance_scale=guidance_scale,
            )  # fmt: skip
        late = t > 0.5
        zeros = torch.zeros_like(speech_condition)
        v = self.model.forward_fm_decoder(
            t=t,
            xt=torch.cat([x, x], dim=0),
            text_condition=torch.cat([torch.zeros_like(text_condition), text_condition], dim=0),
            speech_condition=torch.cat(
                [torch.where(late, zeros, speech_condition), speech_condition], dim=0
            ),
        )
        n = x.shape[0]
        v_uncond, v_cond = v[:n], v[n:]
        g = torch.where(late, guidance_scale, guidance_scale * 2.0)
        return (1.0 + g) * v_cond - g * v_uncond


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
        graph = onnx.load(str(tmp))
        if fuse_bias_gemm(graph):
            onnx.save(graph, str(tmp))
        onnx.checker.check_model(graph)  # the graph in memory: no second parse of the file

    atomic_write(path, write)


def int8_name(name: str) -> str:
    """Upstream's name of a graph's dynamic-int8 copy: fm_decoder.onnx -> fm_decoder_int8.onnx."""
    return name.replace(".onnx", "_int8.onnx")


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
        list(TEXT_ENCODER_INPUTS),
        list(TEXT_ENCODER_OUTPUTS),
        {
            "tokens": {0: "N", 1: "T"},
            "prompt_tokens": {0: "N", 1: "T_prompt"},
            "text_condition": {0: "N", 1: "F"},
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
        torch.tensor(0.3),
        torch.randn(batch, frames, feat_dim),
        torch.randn(batch, frames, feat_dim),
        torch.randn(batch, frames, feat_dim),
        torch.tensor(1.0),
    )
    axes = {name: {0: "N", 1: "F"} for name in FM_DECODER_INPUTS[1:4] + FM_DECODER_OUTPUTS}
    _export(
        OnnxFmDecoder(model, distill),
        args,
        path,
        list(FM_DECODER_INPUTS),
        list(FM_DECODER_OUTPUTS),
        dict(axes),
        exporter,
    )
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
        with quiet_info_logs("onnxruntime"):  # one INFO line per tensor otherwise
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


def _metadata(model: nn.Module, kind: str, extra: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-graph metadata: upstream's keys first (what sherpa-onnx reads), then what this
    project's runtime reads (model_type; tokenizer, lang and provenance from `extra`)."""
    author = "k2-fsa (adapter merged)" if extra.get("lora_merged") == "1" else "k2-fsa"
    common = {"version": EXPORT_FORMAT_VERSION, "model_author": author}
    ours = {"model_type": kind, "feat_dim": str(model.feat_dim)}
    ours.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})
    text = {**common, "comment": f"{kind} text encoder", "use_espeak": "1", "use_pinyin": "1"}
    decoder = {**common, "comment": f"{kind} flow-matching decoder", **AUDIO_METADATA}
    decoder["feat_dim"] = str(model.feat_dim)
    return {"text_encoder": {**ours, **text}, "fm_decoder": {**ours, **decoder}}


def _model_config(model: nn.Module, model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """model.json for the folder: {"model": constructor arguments, "feature": ...}."""
    config = model_config if model_config is not None else getattr(model, "model_config", None)
    if config is None:
        raise OnnxExportError(
            "model.json is part of the export: pass model_config (the model folder's "
            "model.json), or build the model with zipvoice.models.loader.build_model"
        )
    config = dict(config)
    body = config["model"] if "model" in config else config
    feature = config.get("feature", {"sampling_rate": 24000, "type": "vocos"})
    return {"model": dict(body), "feature": dict(feature)}


def _export_decoders(
    model: nn.Module, out_dir: Path, distill: bool, exporter: str, meta: dict[str, Any]
) -> dict[str, Path]:
    """fm_decoder.onnx (adapter as merged), and for a time-gated model also
    fm_decoder_base.onnx (the base weights), each from the gate's weight set."""
    gate = getattr(model, "time_gate", None)
    written: dict[str, Path] = {}
    variants = [("fm_decoder", FM_DECODER_FILE, True)]
    if gate is not None:
        variants.append(("fm_decoder_base", FM_DECODER_BASE_FILE, False))
        t_range = ",".join(f"{v:g}" for v in gate.t_range)
        meta = {**meta, "lora_t_range": t_range}
    for key, name, adapted in variants:
        if gate is not None:
            with gate.hold(adapted):
                written[key] = export_fm_decoder(model, out_dir / name, distill, exporter)
        else:
            written[key] = export_fm_decoder(model, out_dir / name, distill, exporter)
        role = {} if adapted else {"comment": meta["comment"] + " without the adapter"}
        add_metadata(written[key], {**meta, **role})
    return written


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    token_file: str | Path,
    metadata: Mapping[str, Any] | None = None,
    int8: bool = False,
    vocoder: nn.Module | None = None,
    exporter: str = "torchscript",
    model_config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write upstream's folder: text_encoder.onnx, fm_decoder.onnx (+ *_int8.onnx),
    model.json, tokens.txt; plus fm_decoder_base.onnx for a time-gated model
    (`model.time_gate`), vocoder.onnx when given, and the 'onnx' manifest of all of them.

    Refuses a model whose decoder still carries unmerged PEFT adapters: their extra matmuls
    would cost inference time and the graph would depend on PEFT's module layout.
    """
    from zipvoice.models.modules.adapter_folder import fingerprint_state_dict
    from zipvoice.models.zipvoice_distill import ZipVoiceDistill

    if is_lora_model(model):
        raise OnnxExportError(
            "the model carries unmerged LoRA/DoRA adapters; merge them first "
            "(load_adapter(..., merge=True) or merge_lora_weights) so the exported graph "
            "holds plain weights"
        )
    config = _model_config(model, model_config)
    distill = isinstance(model, ZipVoiceDistill)
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _metadata(model, "zipvoice_distill" if distill else "zipvoice", metadata or {})

    written: dict[str, Path] = {}
    written["text_encoder"] = export_text_encoder(model, out_dir / TEXT_ENCODER_FILE, exporter)
    add_metadata(written["text_encoder"], meta["text_encoder"])
    written.update(_export_decoders(model, out_dir, distill, exporter, meta["fm_decoder"]))
    if int8:
        for key in list(written):
            written[f"{key}_int8"] = quantize_int8(
                written[key], out_dir / int8_name(written[key].name)
            )
    if vocoder is not None:
        written["vocoder"] = export_vocoder(vocoder.eval(), out_dir / VOCODER_FILE, exporter)
        add_metadata(written["vocoder"], {"comment": "Vocos mel vocoder", "sample_rate": "24000"})
    if Path(token_file).resolve() != (out_dir / TOKENS_FILE).resolve():
        atomic_copy(token_file, out_dir / TOKENS_FILE)
    written["tokens"] = out_dir / TOKENS_FILE
    written["model_config"] = out_dir / MODEL_CONFIG_FILE
    atomic_write_json(written["model_config"], config)
    base = (metadata or {}).get("lora_base_fingerprint") or fingerprint_state_dict(
        model.state_dict()
    )
    write_manifest(out_dir, "onnx", base_fingerprint=base, files=written.values())
    return written
