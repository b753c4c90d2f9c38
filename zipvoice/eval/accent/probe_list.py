"""Write the accent probe sentences as an inference test list.

    python -m zipvoice.eval.accent.probe_list --output probes.tsv \\
        --prompt-wav prompt.wav --prompt-text "プロンプトの書き起こし"

One line per probe word (`name<TAB>prompt_text<TAB>prompt_wav<TAB>これは＿です。`), all with the
given prompt, so a model generates every member of every minimal pair in one voice; score the
results with `python -m zipvoice.eval.accent.probe`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zipvoice.eval.accent.probe import PROBE_WORDS, probe_sentence
from zipvoice.utils.cli import exit_on_error, setup_logging
from zipvoice.utils.fileio import atomic_write_text


def probe_list_text(prompt_text: str, prompt_wav: str, prefix: str = "") -> str:
    """The test list's text: every probe word in the carrier sentence with this prompt."""
    if "\t" in prompt_text or "\n" in prompt_text or "\t" in prompt_wav:
        raise ValueError("prompt text and wav path must not contain tabs or newlines")
    lines = [
        f"{prefix}{p.name}\t{prompt_text}\t{prompt_wav}\t{probe_sentence(p)}" for p in PROBE_WORDS
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="Test list (tsv) to write.")
    parser.add_argument("--prompt-wav", required=True, help="Prompt audio for every line.")
    parser.add_argument("--prompt-text", required=True, help="Transcript of the prompt.")
    parser.add_argument("--prefix", default="", help="Prefix of every utterance name.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    args = parser.parse_args(argv)
    setup_logging()

    @exit_on_error
    def run() -> None:
        output = Path(args.output)
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{output} exists (pass --overwrite to replace it)")
        text = probe_list_text(args.prompt_text, args.prompt_wav, args.prefix)
        atomic_write_text(output, text)
        print(f"wrote {len(PROBE_WORDS)} probe sentences to {output}")

    return run()


if __name__ == "__main__":
    sys.exit(main())
