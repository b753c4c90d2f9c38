"""Turn a tsv corpus description into lhotse manifests, checking every row first.

A corpus should not quietly lose utterances, so every bad row (columns, id, text, times,
unreadable audio) is collected with its line number before anything is written; the caller
then either fails with all of them listed or skips them, and they go to a rejected-rows report
either way. The tsv format is described in `zipvoice.bin.prepare_dataset`.

Manifests and reports are written atomically (`zipvoice.utils.fileio`), as everything the
package writes, so an interrupted run never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile
from lhotse import CutSet, MonoCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from tqdm.auto import tqdm

from zipvoice.dataset.config import ON_ERROR_CHOICES
from zipvoice.utils.fileio import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

# Rounding in tools that write start/end times: an end this close past the file's end is clipped.
END_TOLERANCE_S = 0.05
MAX_LISTED_ERRORS = 30


def list_problems(title: str, problems: list[str], footer: list[str]) -> str:
    """An error message that stays readable with thousands of problems: the first
    MAX_LISTED_ERRORS under `title`, a count of the rest, then `footer` (the report has all)."""
    lines = [title] + [f"  {p}" for p in problems[:MAX_LISTED_ERRORS]]
    if len(problems) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_ERRORS} more")
    return "\n".join(lines + footer)


@dataclass(frozen=True)
class RejectedRow:
    """One tsv line that cannot become an utterance, and why."""

    line: int
    reason: str
    raw: str


class InvalidRowsError(ValueError):
    """Raised with `--on-error fail` when any tsv row is bad; lists every bad row."""

    def __init__(self, tsv_path: Path, rejected: list[RejectedRow], report: Path | None) -> None:
        self.tsv_path = tsv_path
        self.rejected = rejected
        footer = [] if report is None else [f"All of them are listed in {report}."]
        footer.append("Fix these rows, or pass --on-error skip to leave them out.")
        super().__init__(
            list_problems(
                f"{tsv_path}: {len(rejected)} invalid row(s):",
                [f"line {r.line}: {r.reason}" for r in rejected],
                footer,
            )
        )


@dataclass(frozen=True)
class PreparedManifests:
    recordings: Path
    supervisions: Path
    cuts: Path
    rejected_tsv: Path | None
    num_cuts: int
    rejected: list[RejectedRow]


@dataclass(frozen=True)
class TsvRow:
    """A line that passed the checks needing no audio; `end` None means the end of the file."""

    line: int
    uniq_id: str
    text: str
    wav_path: str
    start: float
    end: float | None
    raw: str


def manifest_paths(output_dir: str | os.PathLike, prefix: str, subset: str) -> dict[str, Path]:
    """Where prepare_dataset writes for this prefix and subset."""
    output_dir = Path(output_dir)
    return {
        "recordings": output_dir / f"{prefix}_recordings_{subset}.jsonl.gz",
        "supervisions": output_dir / f"{prefix}_supervisions_{subset}.jsonl.gz",
        "cuts": output_dir / f"{prefix}_cuts_{subset}.jsonl.gz",
        "rejected": output_dir / f"{prefix}_{subset}_rejected.tsv",
    }


def normalize_text(text: str) -> str:
    """ "_" is the padding token, so it becomes a space; runs of whitespace collapse to one."""
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip()


def speaker_from_id(uniq_id: str) -> str | None:
    head, sep, _ = uniq_id.partition("_")
    return head if sep and head else None


def _resolve_wav(wav: str, tsv_dir: Path) -> str:
    path = Path(os.path.expanduser(wav))
    if not path.is_absolute() and not path.exists() and (tsv_dir / path).exists():
        path = tsv_dir / path
    return os.path.abspath(path)


def _parse_time(value: str, name: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{name} {value!r} is not finite")
    return seconds


def read_tsv_rows(tsv_path: Path) -> tuple[list[TsvRow], list[RejectedRow]]:
    """Syntax checks that need no audio: encoding, columns, id, text, times, duplicates."""
    rows: list[TsvRow] = []
    rejected: list[RejectedRow] = []
    first_line_of: dict[str, int] = {}
    tsv_dir = tsv_path.resolve().parent
    with open(tsv_path, "rb") as f:
        for line_no, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                shown = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
                rejected.append(RejectedRow(line_no, f"not valid UTF-8 ({e.reason})", shown))
                continue
            if line_no == 1:
                raw = raw.removeprefix("\ufeff")
            raw = raw.rstrip("\r\n")
            if "\x00" in raw:
                rejected.append(RejectedRow(line_no, "NUL byte (binary or UTF-16 file?)", raw))
                continue
            if not raw.strip():
                continue  # blank lines carry no utterance
            cols = [c.strip() for c in raw.split("\t")]

            def reject(reason: str, _line: int = line_no, _raw: str = raw) -> None:
                rejected.append(RejectedRow(_line, reason, _raw))

            if len(cols) not in (3, 5):
                reject(
                    f"expected 3 (id, text, wav) or 5 (id, text, wav, start, end) tab-separated "
                    f"columns, got {len(cols)}"
                )
                continue
            uniq_id, text, wav = cols[0], normalize_text(cols[1]), cols[2]
            if not uniq_id:
                reject("empty id")
                continue
            if uniq_id in first_line_of:
                reject(f"duplicate id {uniq_id!r} (first used on line {first_line_of[uniq_id]})")
                continue
            first_line_of[uniq_id] = line_no
            if not text:
                reject("empty text")
                continue
            if not wav:
                reject("empty wav path")
                continue
            start, end = 0.0, None
            if len(cols) == 5:
                try:
                    start = _parse_time(cols[3], "start")
                    end = _parse_time(cols[4], "end")
                except ValueError as e:
                    reject(f"bad start/end: {e}")
                    continue
                if start < 0 or end <= start:
                    reject(f"bad start/end: need 0 <= start < end, got start={start}, end={end}")
                    continue
            rows.append(TsvRow(line_no, uniq_id, text, _resolve_wav(wav, tsv_dir), start, end, raw))
    return rows, rejected


def _recording_id(wav_path: str) -> str:
    digest = hashlib.sha1(wav_path.encode("utf-8")).hexdigest()[:10]
    return f"{Path(wav_path).stem}-{digest}"


def _short_reason(wav_path: str, error: Exception) -> str:
    """lhotse lists every backend's failure; libsndfile's one line is the useful part."""
    try:
        soundfile.info(wav_path)
    except Exception as sf_error:
        return str(sf_error)
    return " ".join(str(error).split())[:300] or type(error).__name__


def _probe_audio(wav_path: str) -> Recording | str:
    """A Recording, or the reason the file cannot be used."""
    if not os.path.isfile(wav_path):
        return f"audio file not found: {wav_path}"
    try:
        recording = Recording.from_file(wav_path, recording_id=_recording_id(wav_path))
    except Exception as e:  # any decoder error means the same thing to the user
        return f"cannot read audio file {wav_path}: {_short_reason(wav_path, e)}"
    if recording.num_samples <= 0 or recording.duration <= 0:
        return f"audio file has no samples: {wav_path}"
    return recording


def _probe_all(paths: Iterable[str], num_jobs: int) -> dict[str, Recording | str]:
    paths = sorted(set(paths))
    if num_jobs <= 1:
        results = [_probe_audio(p) for p in tqdm(paths, desc="Reading audio headers")]
    else:
        with ThreadPoolExecutor(max_workers=num_jobs) as ex:
            results = list(
                tqdm(ex.map(_probe_audio, paths), total=len(paths), desc="Reading audio headers")
            )
    return dict(zip(paths, results, strict=True))


# The old name, still imported by recipes under egs/.
write_text_atomically = atomic_write_text


def write_manifest_atomically(
    manifest: RecordingSet | SupervisionSet | CutSet, path: str | os.PathLike
) -> None:
    """The format follows `path`'s suffix, as with lhotse's `to_file`."""
    atomic_write(path, manifest.to_file)


def write_rejected_tsv(path: Path, rejected: list[RejectedRow]) -> None:
    """`line<TAB>reason<TAB>original row`, one per rejected row, after a '#' header."""
    lines = ["# line\treason\toriginal row\n"]
    for r in rejected:
        reason = r.reason.replace("\t", " ").replace("\n", " ")
        lines.append(f"{r.line}\t{reason}\t{r.raw}\n")
    atomic_write_text(path, "".join(lines))


def _prepared_on_disk(out: dict[str, Path]) -> PreparedManifests:
    """The manifests an earlier, identical run wrote (see zipvoice.dataset.finished)."""
    rejected_tsv = out["rejected"] if out["rejected"].is_file() else None
    return PreparedManifests(out["recordings"], out["supervisions"], out["cuts"], rejected_tsv,
                             len(CutSet.from_file(out["cuts"])), [])  # fmt: skip


def _check_paths(
    tsv_path: Path, output_dir: str | os.PathLike, prefix: str, subset: str, overwrite: bool
) -> dict[str, Path]:
    """The output paths, once the input exists and no output would be overwritten unasked."""
    if tsv_path.is_dir():
        raise FileNotFoundError(f"tsv file {tsv_path} is a directory, expected a file")
    if not tsv_path.is_file():
        raise FileNotFoundError(f"tsv file not found: {tsv_path}")
    out = manifest_paths(output_dir, prefix, subset)
    if not overwrite:
        for key in ("recordings", "supervisions", "cuts"):
            if out[key].exists():
                raise FileExistsError(f"{out[key]} already exists; pass --overwrite to replace it")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return out


def _row_cut(
    row: TsvRow, recording: Recording, sampling_rate: int
) -> tuple[SupervisionSegment, MonoCut] | str:
    """The supervision and cut of one row, or why its start/end do not fit the audio."""
    end = recording.duration if row.end is None else row.end
    if row.start >= recording.duration:
        return (
            f"bad start/end: start {row.start} s is not inside the audio "
            f"({recording.duration:.3f} s)"
        )
    if end > recording.duration + END_TOLERANCE_S:
        return (
            f"bad start/end: end {end} s is past the end of the audio ({recording.duration:.3f} s)"
        )
    end = min(end, recording.duration)
    supervision = SupervisionSegment(
        id=row.uniq_id,
        recording_id=recording.id,
        start=row.start,
        duration=end - row.start,
        channel=recording.channel_ids[0],
        text=row.text,
        speaker=speaker_from_id(row.uniq_id),
    )
    cut = MonoCut(
        id=row.uniq_id,
        start=row.start,
        duration=supervision.duration,
        channel=supervision.channel,
        recording=recording,
        supervisions=[supervision.with_offset(-row.start)],
        custom={"tsv_line": row.line},  # lets later stages point at the tsv row
    )
    if recording.sampling_rate != sampling_rate:
        cut = cut.resample(sampling_rate)
    return supervision, cut


def _handle_rejected(
    tsv_path: Path, rejected: list[RejectedRow], kept: int, report: Path, on_error: str
) -> None:
    """Write the rejected rows' report; fail (on_error "fail") or warn about each."""
    rejected.sort(key=lambda r: r.line)
    if not rejected:
        return
    write_rejected_tsv(report, rejected)
    if on_error == "fail":
        raise InvalidRowsError(tsv_path, rejected, report)
    for r in rejected:
        logger.warning("%s:%d skipped: %s", tsv_path, r.line, r.reason)
    logger.warning(
        "Skipped %d of %d rows; they are listed in %s", len(rejected), len(rejected) + kept, report
    )


def prepare_dataset(
    tsv_path: str | os.PathLike,
    prefix: str = "custom",
    subset: str = "train",
    output_dir: str | os.PathLike = "data/manifests",
    num_jobs: int = 1,
    sampling_rate: int = 24000,
    on_error: str = "fail",
    overwrite: bool = False,
) -> PreparedManifests:
    """Validate the tsv and write recordings, supervisions and cuts manifests.

    Raises InvalidRowsError (a ValueError) if any row is bad and `on_error == "fail"`.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    tsv_path = Path(tsv_path)
    from zipvoice.dataset.finished import already_done, mark_done

    settings = {"step": "prepare_dataset", "sampling_rate": sampling_rate, "on_error": on_error}
    finished = manifest_paths(output_dir, prefix, subset)
    if tsv_path.is_file() and already_done(finished["cuts"], [tsv_path], settings, overwrite):
        return _prepared_on_disk(finished)
    out = _check_paths(tsv_path, output_dir, prefix, subset, overwrite)
    logger.info("Reading %s", tsv_path)
    rows, rejected = read_tsv_rows(tsv_path)
    probes = _probe_all((r.wav_path for r in rows), num_jobs)

    recordings: dict[str, Recording] = {}
    supervisions: list[SupervisionSegment] = []
    cuts: list[MonoCut] = []
    multichannel: set[str] = set()
    for row in rows:
        probe = probes[row.wav_path]
        made = probe if isinstance(probe, str) else _row_cut(row, probe, sampling_rate)
        if isinstance(made, str):
            rejected.append(RejectedRow(row.line, made, row.raw))
            continue
        if len(probe.channel_ids) > 1:
            multichannel.add(row.wav_path)
        recordings[probe.id] = probe
        supervisions.append(made[0])
        cuts.append(made[1])

    _handle_rejected(tsv_path, rejected, len(cuts), out["rejected"], on_error)
    if not cuts:
        raise ValueError(f"{tsv_path} holds no usable rows ({len(rejected)} rejected)")
    if multichannel:
        logger.warning(
            "%d audio file(s) have several channels; only the first channel is used",
            len(multichannel),
        )

    write_manifest_atomically(RecordingSet.from_recordings(recordings.values()), out["recordings"])
    write_manifest_atomically(SupervisionSet.from_segments(supervisions), out["supervisions"])
    write_manifest_atomically(CutSet.from_cuts(cuts), out["cuts"])
    if not rejected:
        out["rejected"].unlink(missing_ok=True)  # a report from an earlier run would mislead
    mark_done(out["cuts"], [tsv_path], settings)
    logger.info("Wrote %d cuts to %s", len(cuts), out["cuts"])
    return PreparedManifests(
        recordings=out["recordings"],
        supervisions=out["supervisions"],
        cuts=out["cuts"],
        rejected_tsv=out["rejected"] if rejected else None,
        num_cuts=len(cuts),
        rejected=rejected,
    )
