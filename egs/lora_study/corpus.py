"""The study's corpora: hundreds of English pseudo-speakers, a 20-speaker Japanese fine-tuning set,
held-out speakers of both languages, and the evaluation list of the users' case.

Base voices (the engines' own speakers) are rendered once per sentence and analysed once with
WORLD; every pseudo-speaker of that base voice is a resynthesis (`pseudo_speakers.py`). Splits:

- `en_train`: `en_speakers` pseudo-speakers x `en_utts` sentences of the English train pool
  (the base model's pre-training corpus: English only, like the users' base model, which has
  never heard Japanese);
- `en_heldout`: `en_heldout_speakers` new pseudo-speakers on held-out sentences (the
  pre-training dev set, the fine-tunes' forgetting loss, and English zero-shot prompts);
- `ja_train` / `ja_dev`: `ja_speakers` Japanese pseudo-speakers (the users' ~20-speaker corpus);
  dev sentences are never trained on;
- `ja_heldout`: `ja_heldout_speakers` other Japanese pseudo-speakers, each with a prompt sentence
  and a target sentence that no training set holds, whose ground-truth rendering by that same
  speaker is the accent reference.

`eval_list.tsv` (the inference test-list format) holds one line per held-out speaker:
`ja_<spk>` (Japanese prompt, Japanese text; reference `refs/ja_<spk>.wav`) and `en_<spk>`
(English prompt and text: the zero-shot skill kept). Everything is seeded.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from english_corpus import ENGLISH_SENTENCES, EnglishSpeaker, check_engines
from pseudo_speakers import PseudoSpeaker, analyse, resynthesise, sample_speakers

from zipvoice.dataset.synthetic import JAPANESE_SENTENCES
from zipvoice.utils.fileio import atomic_write_text

logger = logging.getLogger("lora_study")

SAMPLING_RATE = 24000

# The engines' voices the pseudo-speakers start from (Debian: flite, festival + festvox-*,
# espeak-ng; pyopenjtalk's bundled HTS voice for Japanese, at two OpenJTalk settings).
EN_BASES: tuple[EnglishSpeaker, ...] = (
    EnglishSpeaker("flkal", "flite", "kal16"),
    EnglishSpeaker("flawb", "flite", "awb"),
    EnglishSpeaker("flslt", "flite", "slt"),
    EnglishSpeaker("flrms", "flite", "rms"),
    EnglishSpeaker("fekal", "festival", "kal_diphone"),
    EnglishSpeaker("feked", "festival", "ked_diphone"),
    EnglishSpeaker("feslt", "festival", "cmu_us_slt_arctic_hts"),
    EnglishSpeaker("esm1", "espeak", "en-us+m1", pitch=45, words_per_minute=160),
    EnglishSpeaker("esm3", "espeak", "en-us+m3", pitch=40, words_per_minute=165),
    EnglishSpeaker("esf2", "espeak", "en-us+f2", pitch=60, words_per_minute=150),
    EnglishSpeaker("esf4", "espeak", "en-us+f4", pitch=55, words_per_minute=145),
    EnglishSpeaker("esgbm2", "espeak", "en-gb+m2", pitch=35, words_per_minute=170),
    EnglishSpeaker("esgbf3", "espeak", "en-gb-x-rp+f3", pitch=65, words_per_minute=155),
    EnglishSpeaker("esscm4", "espeak", "en-gb-scotland+m4", pitch=50, words_per_minute=160),
)
# name -> (OpenJTalk speed, half-tone shift)
JA_BASES: dict[str, tuple[float, float]] = {"mei": (1.0, 0.0), "meilow": (0.94, -4.0)}

EN_HELDOUT_SENTENCES = 10  # the last ten English sentences: never in pre-training
JA_DEV_SENTENCES = range(30, 34)  # fine-tuning dev texts
JA_EVAL_SENTENCES = range(34, 42)  # held-out speakers' target texts: no training set has them
JA_PROMPT_SENTENCES = range(0, 5)  # short sentences, the held-out speakers' prompts


@dataclass(frozen=True)
class CorpusSizes:
    en_speakers: int = 200
    en_utts: int = 5
    en_heldout_speakers: int = 12
    ja_speakers: int = 20
    ja_utts: int = 12
    ja_heldout_speakers: int = 8
    en_eval_lines: int = 3


@dataclass
class Utterance:
    utt_id: str  # <speaker>_<nnnn>: the speaker is recorded in the supervisions
    split: str
    speaker: PseudoSpeaker
    text: str
    sentence: int


@dataclass
class Plan:
    """What to render, grouped by base voice (one WORLD analysis per base voice x sentence)."""

    utterances: list[Utterance] = field(default_factory=list)

    def add(self, split: str, speaker: PseudoSpeaker, sentences: Sequence[int], texts) -> None:
        for i in sentences:
            self.utterances.append(
                Utterance(f"{speaker.name}_{i:04d}", split, speaker, texts[i], i)
            )


def plan_corpus(sizes: CorpusSizes, seed: int) -> tuple[Plan, dict[str, list[PseudoSpeaker]]]:
    """Speakers and their sentences; deterministic for (sizes, seed)."""
    rng = random.Random(seed)
    en_bases = [b.name for b in EN_BASES]
    groups = {
        "en_train": sample_speakers("en", en_bases, sizes.en_speakers, seed),
        "en_heldout": sample_speakers("enho", en_bases, sizes.en_heldout_speakers, seed + 1),
        "ja_train": sample_speakers("ja", list(JA_BASES), sizes.ja_speakers, seed + 2),
        "ja_heldout": sample_speakers("jaho", list(JA_BASES), sizes.ja_heldout_speakers, seed + 3),
    }
    plan = Plan()
    en_pool = range(len(ENGLISH_SENTENCES) - EN_HELDOUT_SENTENCES)
    en_held = list(range(len(ENGLISH_SENTENCES) - EN_HELDOUT_SENTENCES, len(ENGLISH_SENTENCES)))
    for spk in groups["en_train"]:
        plan.add("en_train", spk, sorted(rng.sample(en_pool, sizes.en_utts)), ENGLISH_SENTENCES)
    for j, spk in enumerate(groups["en_heldout"]):
        picks = [en_held[(j + k) % len(en_held)] for k in (0, 3, 6)]
        plan.add("en_heldout", spk, picks, ENGLISH_SENTENCES)
    for k, spk in enumerate(groups["ja_train"]):
        plan.add("ja_train", spk, sorted(rng.sample(range(30), sizes.ja_utts)), JAPANESE_SENTENCES)
        plan.add("ja_dev", spk, [JA_DEV_SENTENCES[k % len(JA_DEV_SENTENCES)]], JAPANESE_SENTENCES)
    for j, spk in enumerate(groups["ja_heldout"]):
        picks = [JA_PROMPT_SENTENCES[j % len(JA_PROMPT_SENTENCES)],
                 JA_EVAL_SENTENCES[j % len(JA_EVAL_SENTENCES)]]  # fmt: skip
        plan.add("ja_heldout", spk, picks, JAPANESE_SENTENCES)
    return plan, groups


# ------------------------------------------------------------------ rendering (worker side)


def _render_base(base: str, texts: dict[int, str], tmp: Path) -> dict[int, np.ndarray]:
    """The base voice saying each sentence: 24 kHz float64, edge silences trimmed."""
    from english_corpus import synthesize_festival, synthesize_one

    from zipvoice.utils.audio import load_audio, trim_silence

    if base in JA_BASES:
        from zipvoice.dataset.synthetic import PseudoSpeaker as OpenJTalkSetting
        from zipvoice.dataset.synthetic import synthesize

        speed, half_tone = JA_BASES[base]
        waves = {i: synthesize(t, OpenJTalkSetting(speed, half_tone)) for i, t in texts.items()}
    else:
        voice = next(b for b in EN_BASES if b.name == base)
        jobs = [(t, tmp / f"{base}_{i:04d}.wav") for i, t in texts.items()]
        if voice.engine == "festival":
            synthesize_festival(voice, jobs, tmp)
        else:
            for text, path in jobs:
                synthesize_one(voice, text, path)
        paths = dict(zip(texts, (path for _, path in jobs), strict=True))
        waves = {i: load_audio(path, SAMPLING_RATE) for i, path in paths.items()}
    out = {}
    for i, wave in waves.items():
        trimmed = trim_silence(wave, SAMPLING_RATE)
        out[i] = np.asarray(trimmed, dtype=np.float64).reshape(-1)
    return out


def render_group(base: str, utterances: list[Utterance], wav_dir: Path) -> list[str]:
    """Render, analyse and resynthesise one base voice's share of the plan; returns tsv rows
    `split<TAB>id<TAB>text<TAB>wav`."""
    import torch

    from zipvoice.utils.audio import save_wav

    torch.set_num_threads(1)
    texts = {u.sentence: u.text for u in utterances}
    with tempfile.TemporaryDirectory() as tmp:
        sources = _render_base(base, texts, Path(tmp))
    features = {i: analyse(wave, SAMPLING_RATE) for i, wave in sources.items()}
    rows = []
    for u in utterances:
        wave = resynthesise(features[u.sentence], u.speaker)
        path = wav_dir / f"{u.utt_id}.wav"
        save_wav(path, wave, sr=SAMPLING_RATE)
        rows.append(f"{u.split}\t{u.utt_id}\t{u.text}\t{path.resolve()}")
    return rows


def _chunks(plan: Plan, per_chunk: int) -> list[tuple[str, list[Utterance]]]:
    """Work units: one base voice's utterances, cut into pieces of about `per_chunk` so that
    the two language's few base voices spread over the workers too."""
    by_base: dict[str, list[Utterance]] = {}
    for u in plan.utterances:
        by_base.setdefault(u.speaker.base, []).append(u)
    units = []
    for base, utts in by_base.items():
        for start in range(0, len(utts), per_chunk):
            units.append((base, utts[start : start + per_chunk]))
    units.sort(key=lambda unit: -len(unit[1]))  # longest first: workers finish together
    return units


def render_corpus(plan: Plan, out_dir: Path, jobs: int) -> dict[str, list[str]]:
    """All utterances of `plan` under `out_dir/wavs`; split -> `id\\ttext\\twav` rows."""
    if any(u.speaker.base not in JA_BASES for u in plan.utterances):
        check_engines(EN_BASES)
    wav_dir = out_dir / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    units = _chunks(plan, per_chunk=120)
    rows: list[str] = []
    if jobs <= 1:
        for base, utts in units:
            rows += render_group(base, utts, wav_dir)
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(render_group, b, u, wav_dir) for b, u in units]
            for future in futures:
                rows += future.result()
    by_split: dict[str, list[str]] = {}
    for row in sorted(rows):
        split, rest = row.split("\t", 1)
        by_split.setdefault(split, []).append(rest)
    return by_split


def write_eval_lists(
    out_dir: Path,
    by_split: dict[str, list[str]],
    groups: dict[str, list[PseudoSpeaker]],
    en_lines: int,
) -> dict[str, Path]:
    """`eval_ja.tsv`, the users' case (held-out JA prompt -> unseen JA text; the same speaker's
    rendering of that text in `refs/`, the accent reference) and `eval_en.tsv` (held-out EN
    prompt -> unseen EN text, its ground truth in `refs_en/`: the zero-shot skill kept)."""
    import shutil

    rows = {r.split("\t")[0]: r.split("\t") for s in ("ja_heldout", "en_heldout")
            for r in by_split[s]}  # fmt: skip
    out: dict[str, Path] = {}
    for lang, speakers, prompts, targets in (
        ("ja", groups["ja_heldout"], JA_PROMPT_SENTENCES, JA_EVAL_SENTENCES),
        ("en", groups["en_heldout"][:en_lines], None, None),
    ):
        refs = out_dir / ("refs" if lang == "ja" else "refs_en")
        refs.mkdir(parents=True, exist_ok=True)
        lines = []
        for spk in speakers:
            utts = sorted(k for k in rows if k.startswith(spk.name + "_"))
            if prompts is None:
                prompt, target = rows[utts[0]], rows[utts[1]]
            else:
                prompt = next(rows[k] for k in utts if int(k.split("_")[1]) in prompts)
                target = next(rows[k] for k in utts if int(k.split("_")[1]) in targets)
            name = f"{lang}_{spk.name}"
            lines.append(f"{name}\t{prompt[1]}\t{prompt[2]}\t{target[1]}")
            shutil.copyfile(target[2], refs / f"{name}.wav")
        out[f"eval_{lang}"] = out_dir / f"eval_{lang}.tsv"
        out[f"refs_{lang}"] = refs
        atomic_write_text(out[f"eval_{lang}"], "".join(line + "\n" for line in lines))
    return out
