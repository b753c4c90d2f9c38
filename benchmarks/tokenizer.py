"""Japanese tokenizer throughput: serial vs a process pool over all cores.

    .venv/bin/python benchmarks/tokenizer.py [--sentences 2000] [--workers N]

The pool pays for starting processes and loading OpenJTalk in each, so the ratio is only
worth it on long lists (data preparation), which is where `texts_to_tokens` uses it.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from zipvoice.tokenizer.tokenizer import JapaneseTokenizer, available_cpus

SUBJECTS = ["私は", "彼女は", "東京の友達が", "新しいコンピューターは", "子供たちは", "NHKの記者が"]
OBJECTS = ["本を", "ラーメンを", "iPhoneを", "手紙を", "2024年3月15日の新聞を", "３．１４の値を"]
VERBS = ["読みました", "食べたい", "買ったそうです", "書きますか？", "見つけた！", "確認しています"]
TAILS = ["。", "、そして帰った。", "…本当に？", "と言った。", "（たぶん）。", "😀"]


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """Varied, reproducible sentences (accents, numbers, Latin, punctuation, emoji)."""
    rng = random.Random(seed)
    combos = list(itertools.product(SUBJECTS, OBJECTS, VERBS, TAILS))
    rng.shuffle(combos)
    return ["".join(parts) for parts in itertools.islice(itertools.cycle(combos), count)]


def time_run(tokenizer: JapaneseTokenizer, texts: list[str]) -> tuple[float, list[list[str]]]:
    start = time.perf_counter()
    tokens = tokenizer.texts_to_tokens(texts)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=available_cpus())
    args = parser.parse_args()

    texts = make_sentences(args.sentences)
    serial = JapaneseTokenizer(num_workers=1)
    serial.texts_to_tokens(texts[:10])  # load the dictionary outside the timing
    serial_s, serial_tokens = time_run(serial, texts)
    parallel_s, parallel_tokens = time_run(JapaneseTokenizer(num_workers=args.workers), texts)
    if parallel_tokens != serial_tokens:
        raise SystemExit("parallel and serial outputs differ")

    print(f"{'sentences':>9} {'workers':>7} {'seconds':>8} {'sent/s':>9} {'ratio':>6}")
    for workers, seconds in ((1, serial_s), (args.workers, parallel_s)):
        print(
            f"{len(texts):>9} {workers:>7} {seconds:>8.3f} {len(texts) / seconds:>9.0f} "
            f"{serial_s / seconds:>6.2f}"
        )


if __name__ == "__main__":
    main()
