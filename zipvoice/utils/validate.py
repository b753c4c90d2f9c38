"""One validation layer for options and input files, so bad input fails early, in one line,
naming the flag or the file and line, instead of deep inside torch or a codec.

- argparse types (`finite_float`, `positive_float`, `non_negative_float`, `positive_int`,
  `non_negative_int`): NaN and infinities are refused where the flag is parsed, so argparse
  names the flag ("argument --speed: expected a finite number, got 'nan'").
- `check_fits_in_memory` / `model_config_bytes` / `lora_bytes`: sizes planned from model.json
  or a LoRA rank are compared with the memory available before anything is allocated.
- `read_text_lines`: UTF-8 text files (tsv, token files, test lists) with a BOM stripped and
  errors that name the file and line for other encodings (Shift-JIS...) and NUL bytes.
- `assert_not_input`: an output path that resolves to one of the run's inputs is refused
  before any work starts.
- `resolve_device`: a device that this machine does not have is named, not traced.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UTF8_BOM = "\ufeff"
# Fraction of the available memory a planned allocation may take: the rest is for activations,
# the optimiser's temporaries, other processes.
MEMORY_HEADROOM = 0.8


class ValidationError(ValueError):
    """An option or input file that cannot be used; the message names which and why."""


# ----------------------------------------------------------------------------- numbers


def _number(text: str | float, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def finite_float(text: str | float) -> float:
    """argparse type: any finite float (NaN, inf refused)."""
    return float(_number(text, float))


def positive_float(text: str | float) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str | float) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str | int) -> int:
    """argparse type: an integer >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str | int) -> int:
    """argparse type: an integer >= 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def check_finite(name: str, value: float) -> float:
    """For values that do not come through argparse (configs, API callers)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- memory


def available_memory_bytes() -> int | None:
    """MemAvailable (Linux), else physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def check_fits_in_memory(num_bytes: int, what: str, available: int | None = None) -> None:
    """Refuse a planned allocation larger than MEMORY_HEADROOM of the available memory.

    `what` says what is planned and where its size comes from (e.g. "the model of
    exp/model.json"), so the message points at the setting to change."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    if num_bytes > MEMORY_HEADROOM * available:
        raise ValidationError(
            f"{what} needs about {_human(num_bytes)}, more than this machine can give "
            f"({_human(available)} available); reduce the sizes"
        )


def check_finite_tensors(
    state: Mapping[str, Any],
    source: str | os.PathLike,
    hint: str = "the file comes from a run that diverged or is corrupt",
) -> None:
    """Name the file and the first tensors holding NaN or infinity (a diverged run's save):
    caught here, not later as "wave contains NaN"."""
    import torch

    bad = [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValidationError(
            f"{source}: non-finite values (NaN or inf) in {bad[:3]}{more}; {hint}"
        )


# ----------------------------------------------------------------------------- text files


def _encoding_hint(raw: bytes) -> str:
    for name in ("shift_jis", "cp932", "euc_jp"):
        try:
            raw.decode(name)
        except UnicodeDecodeError:
            continue
        return f" (it decodes as {name}: convert it, e.g. `iconv -f {name} -t utf-8`)"
    return ""


def read_text_lines(path: str | os.PathLike, what: str = "text file") -> list[tuple[int, str]]:
    """(line number, line without its line end) for every line of a UTF-8 text file.

    A UTF-8 BOM at the start is dropped (editors on Windows write one). A line that is not
    UTF-8 or holds a NUL byte raises ValidationError naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise ValidationError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    lines: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                column = raw.index(b"\x00") + 1
                raise ValidationError(
                    f"{path}:{number}: NUL byte at column {column}; a {what} must be plain "
                    "UTF-8 text (is it a binary file, or UTF-16?)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValidationError(
                    f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}){_encoding_hint(raw)}"
                ) from None
            if number == 1:
                line = line.removeprefix(UTF8_BOM)
            lines.append((number, line.rstrip("\r\n")))
    return lines


def check_fields_not_empty(path: str | os.PathLike, number: int, fields: Mapping[str, str]) -> None:
    """Name the row and the column when a required field of a tsv row is empty."""
    empty = [name for name, value in fields.items() if not value.strip()]
    if empty:
        raise ValidationError(f"{path}:{number}: empty {', '.join(empty)}")


# Seconds of prompt audio per token outside which the transcript cannot be the audio's: the
# generated speech's length follows this ratio (0.05 s of output from a mismatched prompt).
PLAUSIBLE_SECONDS_PER_TOKEN = (0.02, 0.5)


def warn_if_transcript_mismatch(duration: float, num_tokens: int) -> None:
    """Warn when a prompt's audio length and transcript length do not fit each other."""
    per_token = duration / max(1, num_tokens)
    low, high = PLAUSIBLE_SECONDS_PER_TOKEN
    if not low <= per_token <= high:
        logger.warning(
            "the prompt has %.2f s of audio for %d tokens of transcript (%.3f s each, usually "
            "%.2f-%.2f): does --prompt-text say exactly what the prompt audio says? The output "
            "length follows this ratio",
            duration,
            num_tokens,
            per_token,
            low,
            high,
        )


# ----------------------------------------------------------------------------- paths, devices


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def assert_not_input(
    output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], flag: str = "output"
) -> None:
    """Refuse an output that would replace one of the run's inputs (symlinks and hard links
    followed), before any work is done. `inputs` maps a description (a flag, a tsv row) to a
    path; None entries are skipped."""
    out = Path(output)
    for name, path in inputs.items():
        if path is not None and _same_file(out, Path(path)):
            raise ValidationError(
                f"{flag} {out} is the input {name} ({Path(path).resolve()}); writing it would "
                "destroy that input: choose another output path"
            )


def resolve_device(name: str | None) -> Any:
    """A torch.device: `name`, or CUDA when present else CPU. A device this machine lacks (or a
    misspelt one) gives ValidationError instead of a traceback at the first tensor."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValidationError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValidationError(
                f"--device {name}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} "
                "CUDA); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValidationError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValidationError(f"--device {name}: MPS is not available on this machine")
    return device
