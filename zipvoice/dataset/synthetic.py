"""A small, real Japanese speech corpus made with pyopenjtalk's bundled HTS voice.

Tests and smoke runs need speech that a Japanese tokenizer and a TTS model can actually learn
from, without downloading anything. OpenJTalk ships one voice; changing its speaking rate and
pitch gives a few distinguishable pseudo-speakers. The output is the tsv format that
`zipvoice.bin.prepare_dataset` reads (`id<TAB>text<TAB>wav_path`), so the corpus goes through
exactly the pipeline a user's own data does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zipvoice.utils.fileio import atomic_write_text
from zipvoice.utils.validate import read_text_lines

if TYPE_CHECKING:  # numpy, soxr, torch are imported where used: generate_japanese_corpus --help
    import numpy as np

SAMPLING_RATE = 24000

# Short everyday sentences first: a tiny corpus (the first few) stays quick to make and every
# utterance still lasts more than the 1 s that training filters out by default.
JAPANESE_SENTENCES: tuple[str, ...] = (
    "今日はとても良い天気ですね。",
    "駅までの道を教えてください。",
    "この本は図書館で借りました。",
    "明日の会議は午後三時から始まります。",
    "富士山の頂上から見た朝日は本当に美しかった。",
    "すみません、もう一度ゆっくり話していただけますか？",
    "冷蔵庫に牛乳と卵が残っているはずです。",
    "彼女は毎朝六時に起きて公園を走っている。",
    "新しいスマートフォンの使い方がまだよく分かりません。",
    "京都の古いお寺を訪ねるのが私の趣味です。",
    "電車が遅れたので、約束の時間に間に合いませんでした。",
    "この料理には醤油を少しだけ加えると美味しくなります。",
    "子供たちは雪だるまを作って楽しそうに遊んでいた。",
    "来週の土曜日、一緒に映画を見に行きませんか？",
    "窓を開けると、涼しい風が部屋に入ってきた。",
    "宿題は金曜日までに提出してください。",
    "その問題について、もう少し詳しく説明してもらえますか？",
    "桜の花が咲く季節になると、多くの人が花見に出かけます。",
    "祖母は庭で色とりどりの野菜を育てています。",
    "残念ながら、今日の試合は雨で中止になりました。",
    "図書館では静かにしなければなりません。",
    "えっ、本当に？それは知らなかった！",
    "東京から大阪まで新幹線で約二時間半かかります。",
    "山田さんは来月から海外の支社で働く予定です。",
    "夜空にはたくさんの星がきらきらと輝いていた。",
    "コーヒーと紅茶、どちらがお好きですか？",
    "この道をまっすぐ行って、二つ目の角を右に曲がってください。",
    "昨日買ったばかりの傘を、電車の中に忘れてしまった。",
    "猫が日当たりの良い窓辺で気持ちよさそうに眠っている。",
    "お忙しいところ、ご連絡いただきありがとうございます。",
    "一九六四年に東京で初めてオリンピックが開かれました。",
    "海の近くの小さな町で、静かな夏休みを過ごした。",
    "この薬は食後に一錠ずつ飲んでください。",
    "どんなに難しくても、最後まであきらめないでください。",
    "駅前の新しいパン屋さんは、朝からいつも行列ができている。",
    "秋になると、山の木々が赤や黄色に色づきます。",
    "申し訳ありませんが、その商品は売り切れました。",
    "弟はサッカーの練習で毎日遅くまで学校に残っている。",
    "ねえ、ちょっと手伝ってくれる？",
    "美術館の特別展は今月末まで開かれています。",
    "地震の時は、まず机の下に隠れて頭を守りましょう。",
    "温かいお茶を飲むと、なんだかほっとしますね。",
)


@dataclass(frozen=True)
class PseudoSpeaker:
    """One OpenJTalk voice setting: speaking rate factor and pitch shift in semitones."""

    speed: float
    half_tone: float


# Spread over rate and pitch so neighbouring speakers differ audibly in both.
PSEUDO_SPEAKERS: tuple[PseudoSpeaker, ...] = (
    PseudoSpeaker(speed=1.0, half_tone=0.0),
    PseudoSpeaker(speed=0.9, half_tone=-4.0),
    PseudoSpeaker(speed=1.12, half_tone=3.0),
    PseudoSpeaker(speed=0.95, half_tone=5.0),
    PseudoSpeaker(speed=1.06, half_tone=-2.0),
    PseudoSpeaker(speed=0.88, half_tone=1.5),
    PseudoSpeaker(speed=1.15, half_tone=-5.5),
    PseudoSpeaker(speed=1.0, half_tone=7.0),
)


def load_sentences(path: str | os.PathLike) -> list[str]:
    """One sentence a line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"sentence list {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"sentence list not found: {path}")
    sentences = []
    for _, line in read_text_lines(path, what="sentence list"):  # BOM, encodings named
        line = line.strip()
        if line and not line.startswith("#"):
            sentences.append(line)
    if not sentences:
        raise ValueError(f"sentence list {path} holds no sentences")
    return sentences


def synthesize(text: str, speaker: PseudoSpeaker) -> np.ndarray:
    """OpenJTalk speech for `text` as float32 samples in [-1, 1] at 24 kHz."""
    import numpy as np
    import pyopenjtalk  # imported here: its dictionary loads on first use
    import soxr

    wave, sr = pyopenjtalk.tts(text, speed=speaker.speed, half_tone=speaker.half_tone)
    if wave.size == 0:
        raise ValueError(f"OpenJTalk produced no speech for {text!r} (nothing pronounceable)")
    # pyopenjtalk returns int16-scaled float64 samples.
    wave = np.clip(wave / 32768.0, -1.0, 1.0).astype(np.float32)
    if sr != SAMPLING_RATE:
        wave = soxr.resample(wave, sr, SAMPLING_RATE).astype(np.float32)
    return wave


def _check_sentence(sentence: str) -> None:
    if not sentence.strip():
        raise ValueError("sentences must not be empty")
    if "\t" in sentence or "\n" in sentence or "\r" in sentence:
        raise ValueError(f"sentence {sentence!r} contains a tab or newline; the tsv cannot hold it")


def _utt_id(spk_index: int, sent_index: int) -> str:
    return f"spk{spk_index}_{sent_index:04d}"


def _check_corpus_settings(
    pool: list[str], num_speakers: int, num_sentences: int, dev_fraction: float
) -> None:
    for sentence in pool:
        _check_sentence(sentence)
    if not 1 <= num_speakers <= len(PSEUDO_SPEAKERS):
        raise ValueError(
            f"num_speakers must be between 1 and {len(PSEUDO_SPEAKERS)}, got {num_speakers}"
        )
    if not 1 <= num_sentences <= len(pool):
        raise ValueError(
            f"num_sentences must be between 1 and {len(pool)} (the sentences available), "
            f"got {num_sentences}"
        )
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")


def _num_dev(num_sentences: int, dev_fraction: float) -> int:
    """Sentences held out for dev: the rounded fraction, at least one when there are two."""
    if dev_fraction > 0 and num_sentences >= 2:
        return min(num_sentences - 1, max(1, int(math.floor(num_sentences * dev_fraction + 0.5))))
    return 0


def make_japanese_corpus(
    out_dir: str | os.PathLike,
    num_speakers: int = 2,
    num_sentences: int = 3,
    *,
    name: str = "japanese",
    dev_fraction: float = 0.1,
    sentences: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Synthesise `num_speakers` x `num_sentences` utterances and write the train/dev tsv files.

    Dev holds the last `round(num_sentences * dev_fraction)` sentences (at least one when the
    fraction is positive and there are two or more sentences) for every speaker, so validation
    texts are never seen in training. Output is deterministic for the same arguments.

    Returns {"out_dir", "wav_dir", "train_tsv", "dev_tsv"}; wav paths in the tsv files are
    absolute, so the files work from any directory.
    """
    pool = list(JAPANESE_SENTENCES if sentences is None else sentences)
    _check_corpus_settings(pool, num_speakers, num_sentences, dev_fraction)
    out_dir = Path(out_dir).resolve()
    wav_dir = out_dir / "wavs"
    train_tsv = out_dir / f"{name}_train.tsv"
    dev_tsv = out_dir / f"{name}_dev.tsv"
    jobs = [(s, i) for s in range(num_speakers) for i in range(num_sentences)]
    if not overwrite:
        targets = [train_tsv, dev_tsv] + [wav_dir / f"{_utt_id(s, i)}.wav" for s, i in jobs]
        existing = [p for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]} already exists ({len(existing)} corpus files in {out_dir} would be "
                "replaced); pass overwrite=True (--overwrite) to replace them"
            )
    wav_dir.mkdir(parents=True, exist_ok=True)

    chosen = pool[:num_sentences]
    dev_start = num_sentences - _num_dev(num_sentences, dev_fraction)
    import torch
    from tqdm.auto import tqdm

    from zipvoice.utils.audio import save_wav

    train_rows: list[str] = []
    dev_rows: list[str] = []
    for spk_index, sent_index in tqdm(
        jobs, desc="Synthesising Japanese speech", unit="utt", disable=not progress
    ):
        utt_id = _utt_id(spk_index, sent_index)
        text = chosen[sent_index]
        wav_path = wav_dir / f"{utt_id}.wav"
        wave = synthesize(text, PSEUDO_SPEAKERS[spk_index])
        save_wav(wav_path, torch.from_numpy(wave), sr=SAMPLING_RATE)
        row = f"{utt_id}\t{text}\t{wav_path}"
        (dev_rows if sent_index >= dev_start else train_rows).append(row)

    atomic_write_text(train_tsv, "".join(r + "\n" for r in train_rows))
    atomic_write_text(dev_tsv, "".join(r + "\n" for r in dev_rows))
    logging.info(
        "Wrote %d train and %d dev utterances (%d speakers) to %s",
        len(train_rows),
        len(dev_rows),
        num_speakers,
        out_dir,
    )
    return {"out_dir": out_dir, "wav_dir": wav_dir, "train_tsv": train_tsv, "dev_tsv": dev_tsv}
