"""Morae and their Tokyo high/low pitch from OpenJTalk full-context labels.

The label fields used (see docs/japanese.md): the phoneme (between `-` and `+`), A2 (the mora's
position in its accent phrase, from 1), F1 (morae in the phrase) and F2 (the phrase's accent
type: the mora after which pitch falls, 0 = no fall, "heiban")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_LABEL = re.compile(
    r"^[^-]*-(?P<phone>[^+]+)\+.*?/A:(?P<a1>-?\d+|xx)\+(?P<a2>\d+|xx)\+.*?"
    r"/F:(?P<f1>\d+|xx)_(?P<f2>\d+|xx)#"
)
MORA_FINAL = frozenset("a i u e o A I U E O N cl".split())
SILENCES = frozenset({"sil", "pau"})


@dataclass(frozen=True)
class Mora:
    """One mora: its labels `first..last` (inclusive), text, and place in its accent phrase."""

    first: int
    last: int
    phones: str
    position: int  # A2
    phrase: int  # running index of the accent phrase in the utterance
    phrase_length: int  # F1
    accent: int  # F2


def label_moras(labels: Sequence[str]) -> list[Mora]:
    """Group phoneme labels (silences skipped) into morae: a mora ends at a vowel, N or cl."""
    moras: list[Mora] = []
    phrase, start, phones = -1, None, []
    for index, label in enumerate(labels):
        match = _LABEL.search(label)
        if match is None:
            raise ValueError(f"unexpected OpenJTalk full-context label: {label!r}")
        phone = match.group("phone")
        if phone in SILENCES:
            continue
        start = index if start is None else start
        phones.append(phone)
        if phone not in MORA_FINAL:
            continue
        position = int(match.group("a2"))
        phrase += position == 1
        moras.append(
            Mora(
                start,
                index,
                "".join(phones),
                position,
                phrase,
                int(match.group("f1")),
                int(match.group("f2")),
            )
        )
        start, phones = None, []
    return moras


def accent_phrase(moras: Sequence[Mora], index: int) -> list[Mora]:
    """The morae of the accent phrase that mora `index` belongs to."""
    if not 0 <= index < len(moras):
        raise ValueError(f"mora {index} out of range (utterance has {len(moras)} morae)")
    phrase = moras[index].phrase
    return [m for m in moras if m.phrase == phrase]


def pitch_pattern(phrase: Sequence[Mora]) -> tuple[int, ...]:
    """Tokyo pitch (1 high, 0 low) of each mora of one accent phrase: the first mora is low
    unless the accent is on it; morae up to the nucleus are high and the rest low; heiban
    phrases stay high to the end."""
    accent = phrase[0].accent
    pattern = []
    for mora in phrase:
        if accent == 1:
            high = mora.position == 1
        else:
            high = mora.position > 1 and (accent == 0 or mora.position <= accent)
        pattern.append(int(high))
    return tuple(pattern)
