"""Outputs never land inside inputs: a command must not write into a folder it reads from.

`train_zipvoice --exp-dir` set to the pretrained model's folder used to replace its
tokens.txt with the training one, and `onnx_export --onnx-model-dir` set to the model folder
did the same: the base folder was then no longer the model it was. Commands call
`refuse_output_inside_inputs` before any work, so such a run is refused with nothing written.
Single input files that an output would replace are `zipvoice.utils.validate.assert_not_input`'s
business; this module handles folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


class OutputInsideInputError(ValueError):
    """An output folder is (or lies inside) a folder the command reads from."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_output_inside_inputs(
    output_flag: str,
    output_dir: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
) -> None:
    """Raise OutputInsideInputError when `output_dir` is, or lies inside, one of `inputs`.

    `inputs` maps each input flag to a folder, or to a file standing for its folder (a
    `--checkpoint dir/model.pt` reads the released model folder `dir`, whose tokens.txt and
    model.json an output there would replace); None entries (flags not given) are skipped.
    An input folder refuses outputs anywhere inside it; a file's folder only as the output
    itself, since `model.pt` in the working folder with `--exp-dir exp/ft` is common and
    harmless. Paths are compared after resolving symlinks, so a link to the model folder is
    caught too. An input folder inside the output is allowed: writing `exp/` does not touch
    `exp/base/`'s files unless one is named by the output, which the per-file check covers.
    """
    out = Path(output_dir).expanduser().resolve()
    for flag, value in inputs.items():
        if value is None or value == "":
            continue
        given = Path(value).expanduser()
        is_folder = given.is_dir() or (not given.exists() and not given.suffix)
        folder = (given if is_folder else given.parent).resolve()
        if out == folder or (is_folder and _inside(out, folder)):
            where = "is" if out == folder else "lies inside"
            raise OutputInsideInputError(
                f"{output_flag} {output_dir} {where} the input folder {folder} ({flag} "
                f"{value}); its files would be replaced: choose another {output_flag}"
            )
