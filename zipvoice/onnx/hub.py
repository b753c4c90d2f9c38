"""The published ONNX models on the hub, fetched the way upstream's ONNX inference does.

Upstream keeps each model's ONNX files beside its PyTorch files in the hub repository
k2-fsa/ZipVoice (`zipvoice/`, `zipvoice_distill/`): text_encoder[_int8].onnx,
fm_decoder[_int8].onnx, model.json and tokens.txt. huggingface_hub caches them; without a
network and without a cached copy the download fails with one line saying what to pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zipvoice.models.loader import HUB_REPO_ID, MODEL_NAMES
from zipvoice.onnx.export import (
    FM_DECODER_FILE,
    MODEL_CONFIG_FILE,
    TEXT_ENCODER_FILE,
    TOKENS_FILE,
    int8_name,
)

Download = Callable[..., str]


class HubDownloadError(OSError):
    """The hub could not provide a published model (offline, no cache, missing file)."""


def onnx_file_names(int8: bool) -> tuple[str, ...]:
    name = int8_name if int8 else (lambda n: n)
    return (name(TEXT_ENCODER_FILE), name(FM_DECODER_FILE), MODEL_CONFIG_FILE, TOKENS_FILE)


def download_onnx_model(
    model_name: str, int8: bool = False, download: Download | None = None
) -> Path:
    """The local folder holding `model_name`'s published ONNX files (downloaded or cached).

    `download` replaces huggingface_hub's `hf_hub_download` (tests pass a local copier).
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"--model-name must be one of {MODEL_NAMES}, got {model_name!r}")
    if download is None:
        from huggingface_hub import hf_hub_download as download
    paths = []
    for name in onnx_file_names(int8):
        remote = f"{model_name}/{name}"
        try:
            paths.append(Path(download(repo_id=HUB_REPO_ID, filename=remote)))
        except Exception as err:  # huggingface_hub's and the HTTP stack's own types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise HubDownloadError(
                f"cannot download {remote} from the hub repository {HUB_REPO_ID} (offline, "
                f"and not cached?): {reason}; give --model-dir with a local ONNX folder"
            ) from err
    folders = {p.parent for p in paths}
    if len(folders) != 1:
        raise HubDownloadError(f"the hub files of {model_name} landed in several folders")
    return folders.pop()
