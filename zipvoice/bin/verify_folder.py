#!/usr/bin/env python3
"""Check folders the toolkit wrote against their zipvoice_manifest.json, by hand.

    python -m zipvoice.bin.verify_folder exp/onnx exp/ft/adapter download/zipvoice

Every listed file's size and sha256 is compared (no cache: `--sizes-only 1` for a quick
look); a missing, damaged, swapped or stray file is reported naming it, with exit code 1. A
folder without a manifest (a hub download, a run from before manifests) is reported as such
and does not fail unless `--require-manifest 1`.
"""

from __future__ import annotations

import argparse
import sys

from zipvoice.utils.cli import exit_on_error, str2bool
from zipvoice.utils.manifest import ManifestError, verify_folder


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", help="Folders to check.")
    parser.add_argument("--sizes-only", type=str2bool, default=False, help="Skip the sha256s.")
    parser.add_argument(
        "--require-manifest", type=str2bool, default=False, help="Fail on a folder without one."
    )
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    for folder in args.folders:
        result = verify_folder(folder, hashes=not args.sizes_only)
        if result is None:
            if args.require_manifest:
                raise ManifestError(f"{folder} has no zipvoice_manifest.json")
            print(f"{folder}: no manifest, nothing to check")
            continue
        files = len(result.manifest["files"])
        how = "sizes" if args.sizes_only else "sizes and sha256s"
        print(f"{folder}: ok ({result.manifest.get('kind')}, {files} files, {how} match)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
