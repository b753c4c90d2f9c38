"""English sentences and the Debian TTS engines the study's English base voices come from.

flite's built-in voices, festival's diphone and HTS voices and espeak-ng variants at different
pitch and rate need no download; `corpus.py` renders each base voice once per sentence with
`synthesize_one` / `synthesize_festival` and turns it into many pseudo-speakers
(`pseudo_speakers.py`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLING_RATE = 24000

# Written for this study: short everyday sentences (2-4 s spoken), varied in phonemes.
ENGLISH_SENTENCES: tuple[str, ...] = (
    "The train to the city leaves at seven.",
    "Please close the window before you go.",
    "My brother bought a small red bicycle.",
    "We walked along the river after lunch.",
    "The coffee in this shop is very strong.",
    "She found her keys under the sofa.",
    "It rained all night in the mountains.",
    "Could you pass me the salt, please?",
    "The children painted a picture of the sea.",
    "He reads the newspaper every morning.",
    "Our meeting was moved to Thursday.",
    "The old bridge was built of grey stone.",
    "A cold wind blew across the field.",
    "I will call you when I get home.",
    "The library closes early on Sundays.",
    "They planted tomatoes in the garden.",
    "The clock on the wall stopped at noon.",
    "Bright stars filled the quiet sky.",
    "Do you know where the station is?",
    "The cat jumped onto the kitchen table.",
    "We need more paper for the printer.",
    "Her voice was calm and very clear.",
    "The shop sells fresh bread and cheese.",
    "Turn left at the second traffic light.",
    "The doctor said I should rest for a week.",
    "Snow covered the roofs of the village.",
    "He played the guitar for his friends.",
    "The museum opens at nine in the morning.",
    "Thank you for waiting so patiently.",
    "A small boat drifted toward the shore.",
    "The soup needs a little more pepper.",
    "Everyone laughed at the funny story.",
    "The road was closed because of the flood.",
    "Please write your name on the first page.",
    "The birds flew south before the winter.",
    "I have never seen such a tall tree.",
    "The baker wakes up long before sunrise.",
    "We watched the parade from the balcony.",
    "This jacket is too warm for the summer.",
    "The pilot announced a short delay.",
    "My grandmother grows roses by the fence.",
    "The students finished the exam on time.",
    "Fresh fish arrives at the market daily.",
    "He forgot his umbrella on the bus.",
    "The lamp in the hallway is broken.",
    "Which song would you like to hear?",
    "The lake froze early this year.",
    "Please speak a little more slowly.",
    "Their house has a bright yellow door.",
    "The puppy chased a ball across the yard.",
    "We ordered noodles and green tea.",
    "The storm knocked down three old trees.",
    "Check the answer twice before you submit it.",
    "The concert starts in twenty minutes.",
    "She keeps a diary of every journey.",
    "The path through the forest was muddy.",
    "A loud noise woke the whole family.",
    "The farmer counted his sheep at dusk.",
    "Let us meet at the corner cafe.",
    "The painting hangs above the fireplace.",
)


@dataclass(frozen=True)
class EnglishSpeaker:
    """One synthetic speaker: an engine, a voice of it and, for espeak-ng, pitch and rate."""

    name: str  # no "_" (it separates speaker and utterance number in ids)
    engine: str  # "flite", "festival" or "espeak"
    voice: str
    pitch: int = 50
    words_per_minute: int = 160


# Programs each engine needs and the Debian package that provides them.
ENGINE_PROGRAMS = {"flite": "flite", "festival": "festival", "espeak": "espeak-ng"}


class CorpusToolError(RuntimeError):
    """A TTS program or voice is missing or failed; the message says which and how to fix it."""


def check_engines(speakers: Sequence[EnglishSpeaker]) -> None:
    missing = sorted(
        {ENGINE_PROGRAMS[s.engine] for s in speakers if not shutil.which(ENGINE_PROGRAMS[s.engine])}
    )
    if missing:
        raise CorpusToolError(
            f"missing TTS program(s): {', '.join(missing)}; install them with "
            "`apt-get install flite festival festvox-kallpc16k festvox-kdlpc16k "
            "festvox-us-slt-hts espeak-ng` (egs/lora_study/run.sh does this when run as root)"
        )


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CorpusToolError(
            f"{what} failed (exit {result.returncode}): {' '.join(cmd[:4])} ...: "
            f"{result.stderr.strip()[-500:]}"
        )


def _festival_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def synthesize_festival(speaker: EnglishSpeaker, jobs: list[tuple[str, Path]], tmp: Path) -> None:
    """One festival process per voice: starting festival costs far more than an utterance."""
    lines = [f"(voice_{speaker.voice})"]
    for text, raw_path in jobs:
        lines.append(f'(set! utt (Utterance Text "{_festival_string(text)}"))')
        lines.append("(utt.synth utt)")
        lines.append(f'(utt.save.wave utt "{_festival_string(str(raw_path))}" \'riff)')
    script = tmp / f"{speaker.name}.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _run(["festival", "-b", str(script)], f"festival voice {speaker.voice}")
    missing = [str(p) for _, p in jobs if not p.is_file()]
    if missing:
        raise CorpusToolError(
            f"festival voice {speaker.voice} wrote no audio for {missing[0]}: is its package "
            "installed (festvox-kallpc16k, festvox-kdlpc16k, festvox-us-slt-hts)?"
        )


def synthesize_one(speaker: EnglishSpeaker, text: str, raw_path: Path) -> None:
    if speaker.engine == "flite":
        _run(["flite", "-voice", speaker.voice, "-t", text, "-o", str(raw_path)], "flite")
    elif speaker.engine == "espeak":
        cmd = ["espeak-ng", "-v", speaker.voice, "-p", str(speaker.pitch)]
        cmd += ["-s", str(speaker.words_per_minute), "-w", str(raw_path), text]
        _run(cmd, "espeak-ng")
    else:
        raise ValueError(f"unknown engine {speaker.engine!r}")
