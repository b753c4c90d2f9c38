"""Wall time of `python -m zipvoice.bin.X --help` for every entry point, and against a baseline.

    .venv/bin/python benchmarks/cli_help.py [--baseline REV] [--repeats 3]

`--help` only builds a parser, so its time is what the entry point imports before parsing. With
`--baseline REV`, that git revision's tree is extracted to a temporary folder and both trees are
timed in the same run, interleaved (baseline, current, baseline, current, ...), so that the
machine's load affects both alike. Prints a Markdown table of medians and the ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def entry_points(tree: Path) -> list[str]:
    return sorted(p.stem for p in (tree / "zipvoice" / "bin").glob("*.py") if p.stem != "__init__")


def extract(revision: str, into: Path) -> Path:
    """The `zipvoice/` package of `revision`, written under `into` (git archive, no checkout)."""
    archive = subprocess.run(
        ["git", "archive", revision, "zipvoice"], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def time_help(tree: Path, name: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", f"zipvoice.bin.{name}", "--help"],
        cwd=tree, env=env, capture_output=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="runs per entry point and tree")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": REPO}
        if cli.baseline:
            trees = {cli.baseline: extract(cli.baseline, Path(tmp)), **trees}
        names = entry_points(REPO)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(cli.repeats):
            for name in names:
                for label, tree in trees.items():
                    if (tree / "zipvoice" / "bin" / f"{name}.py").is_file():
                        times.setdefault((label, name), []).append(time_help(tree, name))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"`--help` wall time, median of {cli.repeats}; {os.cpu_count()} cores visible, "
          f"load average {load:.1f} at the end\n")  # fmt: skip
    labels = list(trees)
    print("| entry point | " + " | ".join(f"{label} (s)" for label in labels)
          + (" | ratio |" if len(labels) == 2 else " |"))  # fmt: skip
    print("|---" * (len(labels) + 1 + (len(labels) == 2)) + "|")
    for name in names:
        medians = [statistics.median(times[(label, name)]) if (label, name) in times else None
                   for label in labels]  # fmt: skip
        cells = [f"{m:.2f}" if m is not None else "-" for m in medians]
        ratio = ""
        if len(labels) == 2:
            ratio = f" | {medians[1] / medians[0]:.2f}x" if None not in medians else " | -"
        print(f"| {name} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
