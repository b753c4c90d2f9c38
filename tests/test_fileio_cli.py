"""The shared atomic writers (zipvoice.utils.fileio) and entry-point helpers (utils.cli)."""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path

import pytest

from zipvoice.utils.checkpoint import CheckpointError
from zipvoice.utils.cli import exit_on_error, str2bool
from zipvoice.utils.fileio import (
    atomic_copy,
    atomic_replace_dir,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_uses_a_sibling_ending_with_the_name_and_normal_permissions(
    tmp_path, umask_022
):
    target = tmp_path / "cuts.jsonl.gz"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    atomic_write(target, write)
    # lhotse, soundfile and torch.onnx pick the format from the suffix; hidden while written.
    assert seen[0].parent == tmp_path and seen[0].name.endswith("-cuts.jsonl.gz")
    assert seen[0].name.startswith(".")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["cuts.jsonl.gz"]


def test_text_json_and_copy_writers(tmp_path):
    atomic_write_text(tmp_path / "a.tsv", "x\ty\n")
    assert (tmp_path / "a.tsv").read_bytes() == b"x\ty\n"
    atomic_write_json(tmp_path / "b.json", {"name": "日本語", "path": tmp_path})
    text = (tmp_path / "b.json").read_text(encoding="utf-8")
    assert '"name": "日本語"' in text and f'"path": "{tmp_path}"' in text and text.endswith("}\n")
    atomic_copy(tmp_path / "a.tsv", tmp_path / "c.tsv")
    assert (tmp_path / "c.tsv").read_bytes() == b"x\ty\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "b.json", "c.tsv"]


def test_atomic_replace_dir_swaps_whole_folders_and_cleans_up_on_failure(tmp_path, umask_022):
    out = tmp_path / "adapter"

    def build(version: str):
        def fill(folder: Path) -> None:
            (folder / "weights.bin").write_text(version)
            if version == "broken":
                raise RuntimeError("disk full")
            (folder / "sub").mkdir()
            (folder / "sub" / "meta.json").write_text(version)

        return fill

    atomic_replace_dir(out, build("v1"))
    atomic_replace_dir(out, build("v2"))
    assert (out / "weights.bin").read_text() == "v2" and (out / "sub/meta.json").read_text() == "v2"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_replace_dir(out, build("broken"))
    assert (out / "weights.bin").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize(
    "word, value",
    [("1", True), ("TRUE", True), ("yes", True), ("y", True), ("on", True), ("t", True),
     ("0", False), ("false", False), ("No", False), ("n", False), (" off ", False), ("f", False)],
)  # fmt: skip
def test_str2bool_words(word, value):
    assert str2bool(word) is value


def test_str2bool_rejects_other_words_with_an_argparse_error(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", type=str2bool)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--flag", "maybe"])
    assert exc.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_exit_on_error_reports_expected_errors_and_keeps_tracebacks_for_bugs(capsys, caplog):
    def failing(err: BaseException):
        def main(argv: list[str] | None = None) -> int:
            raise err

        return main

    missing = FileNotFoundError("token file not found: x.txt")
    assert exit_on_error(failing(missing))([]) == 1
    assert capsys.readouterr().err == "error: token file not found: x.txt\n"
    # A project error class that is not a ValueError/OSError counts too.
    assert exit_on_error(failing(CheckpointError("model.pt: refused to load")))() == 1
    assert capsys.readouterr().err == "error: model.pt: refused to load\n"
    with pytest.raises(KeyError):  # a bug: traceback kept
        exit_on_error(failing(KeyError("x")))()
    assert exit_on_error(also=(RuntimeError,))(failing(RuntimeError("bad size")))() == 1
    with pytest.raises(SystemExit, match="^error: bad row$"):
        exit_on_error(system_exit=True)(failing(ValueError("bad row")))()
    logger = logging.getLogger("zipvoice.test")
    with caplog.at_level(logging.ERROR, logger="zipvoice.test"):
        assert exit_on_error(logger=logger)(failing(ValueError("bad run")))() == 1
    assert "error: bad run" in caplog.text
    assert exit_on_error(lambda argv=None: None)() == 0
