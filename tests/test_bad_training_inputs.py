"""Training inputs that used to end in a library error or train nothing (issue 18, item 9): each
is refused, or reported when it bites, in one line that names the file or the flag."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from lhotse import CutSet

from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.test_bad_inputs import train_fails
from tests.test_train import user_flags


def _one_line(msg: str) -> str:
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_max_duration_below_every_cut_is_refused_before_training(
    japanese_fbank_manifests, tmp_path, caplog
):
    data = japanese_fbank_manifests
    cuts = sorted(CutSet.from_file(data["train_cuts"]), key=lambda c: c.duration)
    below = round(cuts[0].duration / 2, 2)
    exp = tmp_path / "exp"
    msg = _one_line(train_fails(user_flags(data, exp, max_duration=below), caplog))
    assert f"--max-duration {below:g} s is below every cut" in msg
    assert str(data["train_cuts"]) in msg and cuts[0].id in msg and cuts[-1].id in msg
    assert not list(exp.glob("checkpoint-*.pt")) and not (exp / "adapter").exists()


@pytest.mark.parametrize(
    "content, named",
    [("[1, 2]", "holds a JSON list"), ("3", "holds a JSON int"),
     ('{"identity": ["lora_rank"]}', '"identity" holds a JSON list')],
)  # fmt: skip
def test_run_config_that_is_json_but_not_an_object_is_named(
    japanese_fbank_manifests, tmp_path, caplog, content, named
):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "run_config.json").write_text(content)
    msg = _one_line(train_fails(user_flags(japanese_fbank_manifests, exp), caplog))
    assert str(exp / "run_config.json") in msg and named in msg
    assert (exp / "run_config.json").read_text() == content  # not overwritten


def _manifest_with_own_feature_file(data: dict, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of the training manifest whose last cut reads its features from a copy of the
    archive of its own: (manifest, that cut's id, its feature file)."""
    cuts = list(CutSet.from_file(data["train_cuts"]))
    last = cuts[-1]
    own = tmp_path / "own_feats.lca"
    shutil.copyfile(last.features.storage_path, own)
    features = dataclasses.replace(last.features, storage_path=str(own))
    manifest = tmp_path / "cuts_train.jsonl.gz"
    CutSet.from_cuts([*cuts[:-1], dataclasses.replace(last, features=features)]).to_file(manifest)
    return manifest, last.id, own


def test_a_missing_feature_file_is_refused_before_training(
    japanese_fbank_manifests, tmp_path, caplog
):
    data = japanese_fbank_manifests
    manifest, cut_id, own = _manifest_with_own_feature_file(data, tmp_path)
    own.unlink()
    exp = tmp_path / "exp"
    msg = _one_line(train_fails(user_flags(data, exp, train_manifest=manifest), caplog))
    assert f"cut {cut_id} in {manifest}" in msg and f"{own} does not exist" in msg
    assert not list(exp.glob("checkpoint-*.pt"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_feature_file_during_training_names_the_cut_and_the_file(
    japanese_fbank_manifests, tmp_path, caplog, workers
):
    """Damaged after the start-up checks (it exists): found when a batch loads it, in the
    training process or in a data-loader worker, and still one line."""
    data = japanese_fbank_manifests
    manifest, cut_id, own = _manifest_with_own_feature_file(data, tmp_path)
    own.write_bytes(b"\x00garbage\xff" * 2)
    argv = user_flags(
        data, tmp_path / "exp", train_manifest=manifest, num_workers=workers, max_duration=3,
        valid_interval=0, save_every_n=0,
    )  # fmt: skip
    msg = _one_line(train_fails(argv, caplog))
    assert f"cut {cut_id} (manifest {manifest})" in msg and str(own) in msg
    assert "cannot be read" in msg
