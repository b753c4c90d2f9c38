"""Phoneme timings of pyopenjtalk's own renderings, from its HTS voice's duration model.

pyopenjtalk synthesises with HTS Engine but does not return how long each phoneme lasted. The
minimal-pair probe needs to know where a word's morae are in that rendering, so this reads the
duration part of the `.htsvoice` file (question set, decision tree, Gaussian state durations)
and repeats HTS Engine's default timing rule: each label walks the tree to a leaf, and each of
its states lasts round(mean) frames, at least 1 (no speed change, no given alignment). The sum
reproduces the rendering's length exactly, which `phoneme_frames` checks."""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_QUESTION = re.compile(r"^QS\s+(\S+)\s+\{(.*)\}\s*$")
_NODE = re.compile(r"^\s*(-?\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


@dataclass(frozen=True)
class DurationModel:
    """The duration stream of one HTS voice."""

    sample_rate: int
    frame_period: int  # samples per frame
    num_states: int
    questions: dict[str, re.Pattern[str]]
    nodes: dict[int, tuple[str, str, str]]  # index -> (question, no child, yes child)
    means: np.ndarray  # (num_pdfs, num_states) state durations in frames

    def state_means(self, label: str) -> np.ndarray:
        """Walk the tree for one full-context label; the leaf's state duration means."""
        index = 0
        while True:
            question, no, yes = self.nodes[index]
            child = yes if self.questions[question].match(label) else no
            if child.startswith('"'):
                leaf = int(re.findall(r"\d+", child)[-1])  # "dur_s2_136" -> pdf 136 (1-based)
                return self.means[leaf - 1]
            index = int(child)

    def frames(self, label: str) -> int:
        """HTS Engine's default duration: per state max(1, round-half-up(mean))."""
        return int(np.maximum(1, np.floor(self.state_means(label) + 0.5)).sum())


def _glob_regex(patterns: str) -> re.Pattern[str]:
    """HTS question patterns are globs (`*` any run, `?` one character), quoted, comma-split."""
    parts = []
    for pattern in re.findall(r'"([^"]*)"', patterns):
        escaped = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
        parts.append(escaped)
    return re.compile("(?:" + "|".join(parts) + r")\Z", re.DOTALL)


def _header(data: bytes) -> tuple[dict[str, str], bytes]:
    start = data.index(b"[DATA]\n")
    fields = {}
    for line in data[:start].decode("ascii").splitlines():
        if ":" in line and not line.startswith("["):
            key, value = line.split(":", 1)
            fields[key] = value
    return fields, data[start + len(b"[DATA]\n") :]


def _section(body: bytes, span: str) -> bytes:
    first, last = (int(x) for x in span.split("-"))
    return body[first : last + 1]


@functools.lru_cache(maxsize=2)
def load_duration_model(path: str | Path | None = None) -> DurationModel:
    """The duration model of an `.htsvoice` file (pyopenjtalk's default voice if None)."""
    if path is None:
        import pyopenjtalk

        path = pyopenjtalk.DEFAULT_HTS_VOICE.decode()
    fields, body = _header(Path(path).read_bytes())
    num_states = int(fields["NUM_STATES"])
    pdf = _section(body, fields["DURATION_PDF"])
    (num_pdfs,) = struct.unpack("<i", pdf[:4])
    values = np.frombuffer(pdf[4:], dtype="<f4").reshape(num_pdfs, 2 * num_states)
    questions, nodes = {}, {}
    for line in _section(body, fields["DURATION_TREE"]).decode("utf-8").splitlines():
        if match := _QUESTION.match(line):
            questions[match.group(1)] = _glob_regex(match.group(2))
        elif match := _NODE.match(line):
            nodes[int(match.group(1))] = (match.group(2), match.group(3), match.group(4))
    return DurationModel(
        sample_rate=int(fields["SAMPLING_FREQUENCY"]),
        frame_period=int(fields["FRAME_PERIOD"]),
        num_states=num_states,
        questions=questions,
        nodes=nodes,
        means=values[:, :num_states].astype(np.float64),
    )


def phoneme_frames(labels: list[str], num_samples: int | None = None) -> np.ndarray:
    """Frames (of the voice's frame period) each label lasts in pyopenjtalk's rendering at
    speed 1. With `num_samples` (the rendering's length) the total is checked against it."""
    model = load_duration_model()
    frames = np.array([model.frames(label) for label in labels], dtype=np.int64)
    if num_samples is not None and int(frames.sum()) * model.frame_period != num_samples:
        raise ValueError(
            f"HTS duration model gives {int(frames.sum())} frames, but the rendering has "
            f"{num_samples / model.frame_period:.1f}; the voice or engine differs from the "
            "one this reader was written for"
        )
    return frames
