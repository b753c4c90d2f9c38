"""The published ONNX models on the hub, fetched the way upstream's ONNX inference does.

Upstream keeps each model's ONNX files beside its PyTorch files in the hub repository
k2-fsa/ZipVoice (`zipvoice/`, `zipvoice_distill/`): text_encoder[_int8].onnx,
fm_decoder[_int8].onnx, model.json and tokens.txt. They are fetched like every other published
file (`zipvoice.utils.hub`): the local cache first, then one short probe of the hub; offline
without a cached copy, one line naming the file and what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

from zipvoice.models.loader import HUB_REPO_ID, MODEL_NAMES
from zipvoice.onnx.export import (
    FM_DECODER_FILE,
    MODEL_CONFIG_FILE,
    TEXT_ENCODER_FILE,
    TOKENS_FILE,
    int8_name,
)
from zipvoice.utils.hub import HubUnavailableError, hub_files


def onnx_file_names(int8: bool) -> tuple[str, ...]:
    name = int8_name if int8 else (lambda n: n)
    return (name(TEXT_ENCODER_FILE), name(FM_DECODER_FILE), MODEL_CONFIG_FILE, TOKENS_FILE)


def download_onnx_model(model_name: str, int8: bool = False) -> Path:
    """The local folder holding `model_name`'s published ONNX files (cached or downloaded)."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"--model-name must be one of {MODEL_NAMES}, got {model_name!r}")
    names = onnx_file_names(int8)
    instead = (
        f"give --model-dir with a local ONNX folder ({', '.join(names)}; "
        "zipvoice.bin.onnx_export writes one)"
    )
    paths = hub_files(HUB_REPO_ID, [f"{model_name}/{n}" for n in names], instead=instead)
    folders = {p.parent for p in paths}
    if len(folders) != 1:
        raise HubUnavailableError(f"the hub files of {model_name} landed in several folders")
    return folders.pop()
