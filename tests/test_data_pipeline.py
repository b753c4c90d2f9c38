"""The data pipeline on real (OpenJTalk) Japanese speech: tsv -> manifests -> tokens -> fbank
-> batches, and how it treats broken input."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from lhotse import CutSet

from tests.conftest import REPO
from tests.data_fixtures import *  # noqa: F403
from zipvoice.dataset.datamodule import TtsDataModule
from zipvoice.dataset.dataset import CutDataError, SpeechSynthesisDataset, on_the_fly_features
from zipvoice.dataset.fbank import FeatureComputationError, compute_fbank
from zipvoice.dataset.manifests import InvalidRowsError, prepare_dataset
from zipvoice.dataset.synthetic import load_sentences, make_japanese_corpus
from zipvoice.dataset.tokens import UntokenizableCutsError, prepare_tokens
from zipvoice.tokenizer.token_file import read_token_file
from zipvoice.tokenizer.tokenizer import JAPANESE_SYMBOLS, get_tokenizer
from zipvoice.utils.audio import load_audio
from zipvoice.utils.feature import compute_vocos_mel
from zipvoice.utils.fileio import atomic_write

LILCOM_ATOL = 0.05  # lilcom stores log-mels on a 2**-5 grid


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def datamodule(manifests: dict, *extra: str) -> TtsDataModule:
    parser = argparse.ArgumentParser()
    TtsDataModule.add_arguments(parser)
    args = parser.parse_args(
        [
            "--dataset", "custom",
            "--train-manifest", str(manifests["train_cuts"]),
            "--dev-manifest", str(manifests["dev_cuts"]),
            "--num-workers", "0",
            *extra,
        ]
    )  # fmt: skip
    return TtsDataModule(args)


def expected_frames(wav_path: str) -> int:
    return (sf.info(wav_path).frames + 128) // 256


# ---------------------------------------------------------------------------- corpus


def test_corpus_is_real_japanese_speech_in_the_tsv_format(japanese_corpus):
    train, dev = read_tsv(japanese_corpus["train_tsv"]), read_tsv(japanese_corpus["dev_tsv"])
    assert [r[0] for r in train] == ["spk0_0000", "spk0_0001", "spk1_0000", "spk1_0001"]
    assert [r[0] for r in dev] == ["spk0_0002", "spk1_0002"]
    assert {r[1] for r in dev}.isdisjoint({r[1] for r in train})  # dev texts are unseen
    for _, _text, wav in train + dev:
        info = sf.info(wav)
        assert info.samplerate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
        assert 1.5 < info.duration < 4.0
        wave = load_audio(wav).numpy()
        assert np.sqrt(np.mean(wave**2)) > 0.01  # speech, not silence
    # Pseudo-speakers differ: same sentence, different rate and pitch.
    spk0, spk1 = sf.read(train[0][2])[0], sf.read(train[2][2])[0]
    assert train[0][1] == train[2][1] and len(spk0) != len(spk1)


def test_corpus_is_deterministic_and_not_overwritten(japanese_corpus, tmp_path):
    again = make_japanese_corpus(tmp_path, num_speakers=1, num_sentences=1, progress=False)
    (row,) = read_tsv(again["train_tsv"])
    reference = japanese_corpus["wav_dir"] / "spk0_0000.wav"
    assert Path(row[2]).read_bytes() == reference.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        make_japanese_corpus(tmp_path, num_speakers=1, num_sentences=1, progress=False)
    sentence_file = tmp_path / "sentences.txt"
    sentence_file.write_text(
        "# my sentences\n\nおはようございます。\nまた明日。\n", encoding="utf-8"
    )
    own = make_japanese_corpus(
        tmp_path / "own", 1, 2, sentences=load_sentences(sentence_file), progress=False
    )
    assert [r[1] for r in read_tsv(own["train_tsv"])] == ["おはようございます。"]
    assert [r[1] for r in read_tsv(own["dev_tsv"])] == ["また明日。"]
    with pytest.raises(ValueError, match="num_speakers"):
        make_japanese_corpus(tmp_path / "x", num_speakers=99, num_sentences=1, progress=False)


# ---------------------------------------------------------------------------- happy path


def test_pipeline_batch_has_features_tokens_and_text(japanese_fbank_manifests, japanese_corpus):
    dm = datamodule(japanese_fbank_manifests, "--max-duration", "6", "--drop-last", "false")
    train_cuts = dm.train_cuts()
    wav_of = {r[0]: r[2] for r in read_tsv(japanese_corpus["train_tsv"])}
    tokenizer = get_tokenizer("japanese")
    seen = []
    for batch in dm.train_dataloaders(train_cuts):
        assert set(batch) == {"features", "features_lens", "tokens", "text", "cut_ids"}
        feats, lens = batch["features"], batch["features_lens"]
        batch_size = len(batch["cut_ids"])
        assert feats.dtype == torch.float32 and lens.dtype == torch.long
        assert feats.shape == (batch_size, int(lens.max()), 100)
        assert batch["tokens"] == tokenizer.texts_to_tokens(batch["text"])
        for i, cut_id in enumerate(batch["cut_ids"]):
            assert int(lens[i]) == expected_frames(wav_of[cut_id])
            reference = compute_vocos_mel(load_audio(wav_of[cut_id])[None])[0]
            torch.testing.assert_close(feats[i, : lens[i]], reference, atol=LILCOM_ATOL, rtol=0)
        seen += batch["cut_ids"]
    assert sorted(seen) == sorted(wav_of)


def test_tokens_map_into_the_extended_token_file(japanese_fbank_manifests):
    token2id = read_token_file(japanese_fbank_manifests["token_file"])
    assert set(JAPANESE_SYMBOLS) <= set(token2id)
    base = japanese_fbank_manifests["base_token_file"]
    if base is not None:  # the reference ids come first, unchanged
        for token, token_id in read_token_file(base).items():
            assert token2id[token] == token_id
    for cut in CutSet.from_file(japanese_fbank_manifests["train_cuts"]):
        tokens = cut.supervisions[0].custom["tokens"]
        assert tokens and all(t in token2id for t in tokens)


def test_on_the_fly_features_match_precomputed(japanese_fbank_manifests):
    cuts = CutSet.from_file(japanese_fbank_manifests["dev_cuts"])
    precomputed = SpeechSynthesisDataset()[cuts]
    on_the_fly = SpeechSynthesisDataset(feature_input_strategy=on_the_fly_features())[cuts]
    torch.testing.assert_close(on_the_fly["features_lens"], precomputed["features_lens"])
    for i, n in enumerate(precomputed["features_lens"]):
        torch.testing.assert_close(
            on_the_fly["features"][i, :n], precomputed["features"][i, :n], atol=LILCOM_ATOL, rtol=0
        )


def test_sampler_state_resumes_mid_epoch(japanese_fbank_manifests):
    dm = datamodule(japanese_fbank_manifests, "--max-duration", "3", "--drop-last", "false")
    cuts = dm.train_cuts()
    full = [b["cut_ids"] for b in dm.train_dataloaders(cuts)]
    assert len(full) == 4  # one ~2.5 s cut per batch
    dl = dm.train_dataloaders(cuts)
    batches = iter(dl)
    head = [next(batches)["cut_ids"] for _ in range(2)]
    state = dl.sampler.state_dict()
    resumed = [b["cut_ids"] for b in dm.train_dataloaders(cuts, sampler_state_dict=state)]
    assert head + resumed == full


@pytest.mark.parametrize("buckets", [1, 2])  # SimpleCutSampler, DynamicBucketingSampler
def test_sampler_position_resumes_after_the_last_consumed_batch_despite_prefetch(
    japanese_fbank_manifests, buckets
):
    """Two workers prefetch batches ahead of the consumer; the position saved after two
    consumed batches resumes with the third, for both of lhotse's ways to restore (replaying
    a batch count, skipping a cut count)."""
    from zipvoice.dataset.sampler_position import SamplerPosition

    dm = datamodule(
        japanese_fbank_manifests, "--max-duration", "3", "--drop-last", "false",
        "--num-buckets", str(buckets), "--num-workers", "2",
    )  # fmt: skip
    # 20 cuts (each once per speaker and sentence, 5 times under new ids): enough for buckets
    cuts = dm.train_cuts().repeat(times=5).to_eager()
    full = [b["cut_ids"] for b in dm.train_dataloaders(cuts)]
    assert len(full) >= 8
    dl = dm.train_dataloaders(cuts)
    kind = "DynamicBucketingSampler" if buckets > 1 else "SimpleCutSampler"
    assert type(dl.sampler).__name__ == kind
    position = SamplerPosition(dl.sampler)
    position.restart()
    batches = iter(dl)
    head = []
    for _ in range(2):
        head.append(next(batches)["cut_ids"])
        position.consumed()
    assert position.ahead > 0  # the workers' prefetch: the sampler is ahead of the consumer
    state = position.state_dict()
    del batches
    resumed = [b["cut_ids"] for b in dm.train_dataloaders(cuts, sampler_state_dict=state)]
    assert head + resumed == full


def test_upstream_defaults_still_give_batches_on_a_tiny_corpus(japanese_fbank_manifests):
    # 30 buckets x drop_last at 200 s would drop every cut of a small corpus. Workers on, as
    # in training: the dataset must survive being sent to worker processes.
    dm = datamodule(japanese_fbank_manifests, "--num-workers", "2")
    ids = [cid for b in dm.train_dataloaders(dm.train_cuts()) for cid in b["cut_ids"]]
    assert sorted(ids) == ["spk0_0000", "spk0_0001", "spk1_0000", "spk1_0001"]
    dev_ids = [cid for b in dm.dev_dataloaders(dm.dev_cuts()) for cid in b["cut_ids"]]
    assert sorted(dev_ids) == ["spk0_0002", "spk1_0002"]


def test_duration_filter_logs_removed_cuts(japanese_fbank_manifests, caplog):
    durations = sorted(c.duration for c in CutSet.from_file(japanese_fbank_manifests["train_cuts"]))
    threshold = (durations[1] + durations[2]) / 2
    dm = datamodule(japanese_fbank_manifests, "--min-len", str(threshold))
    with caplog.at_level(logging.INFO):
        kept = dm.train_cuts()
    assert len(kept) == 2 and all(c.duration >= threshold for c in kept)
    assert "removed 2 of 4 cuts" in caplog.text and "2 too short" in caplog.text
    with pytest.raises(ValueError, match="all 4 cuts"):
        datamodule(japanese_fbank_manifests, "--max-len", "0.5", "--min-len", "0.1").train_cuts()


def test_segments_and_other_sample_rates_are_resampled(japanese_corpus, tmp_path):
    _, text, wav = read_tsv(japanese_corpus["train_tsv"])[0]
    wave24, _ = sf.read(wav, dtype="float32")
    wav48 = tmp_path / "speech48k.wav"
    sf.write(wav48, soxr.resample(wave24, 24000, 48000), 48000)
    tsv = tmp_path / "rates.tsv"
    tsv.write_text(f"spk9_0000\t{text}\t{wav48}\nspk9_0001\t{text}\t{wav48}\t0.512\t1.512\n")
    prepare_dataset(tsv, prefix="rates", subset="raw", output_dir=tmp_path / "m")
    prepare_tokens(
        tmp_path / "m/rates_cuts_raw.jsonl.gz",
        tmp_path / "m/rates_cuts_all.jsonl.gz",
        tokenizer="japanese",
    )
    out = compute_fbank(
        tmp_path / "m", tmp_path / "fb", prefix="rates", subset="all", progress=False
    )
    cuts = CutSet.from_file(out)
    assert [c.sampling_rate for c in cuts] == [24000, 24000]
    assert [c.supervisions[0].speaker for c in cuts] == ["spk9", "spk9"]
    full, segment = cuts
    assert full.num_frames == (len(wave24) + 128) // 256
    assert segment.duration == pytest.approx(1.0) and segment.num_frames == (24000 + 128) // 256
    # The segment's features are the full file's frames from 0.512 s (frame 48) on.
    start = 48
    torch.testing.assert_close(
        torch.from_numpy(segment.load_features()[5:-5]),
        torch.from_numpy(full.load_features()[start + 5 : start + segment.num_frames - 5]),
        atol=0.1,
        rtol=0,
    )
    # The same inputs again: finished work is skipped (upstream); other inputs are refused.
    written = out.read_bytes()
    assert compute_fbank(tmp_path / "m", tmp_path / "fb", prefix="rates", subset="all") == out
    assert out.read_bytes() == written
    CutSet.from_cuts([full]).to_file(tmp_path / "m/rates_cuts_all.jsonl.gz")
    with pytest.raises(FileExistsError, match="--overwrite"):
        compute_fbank(tmp_path / "m", tmp_path / "fb", prefix="rates", subset="all")
    with pytest.raises(ValueError, match="24000 Hz"):
        compute_fbank(
            tmp_path / "m", tmp_path / "fb2", prefix="rates", subset="all", sampling_rate=16000
        )


def test_parallel_feature_extraction_matches_serial(japanese_fbank_manifests, tmp_path, caplog):
    raw_dir = japanese_fbank_manifests["raw_manifest_dir"]
    with caplog.at_level(logging.INFO, logger="zipvoice.dataset.fbank"):
        out = compute_fbank(raw_dir, tmp_path, prefix="japanese", subset="train", num_jobs=2)
    assert "with 2 job(s)" in caplog.text  # --num-jobs honoured, even for a tiny set
    parallel = CutSet.from_file(out)
    serial = CutSet.from_file(japanese_fbank_manifests["train_cuts"])
    assert [c.id for c in parallel] == [c.id for c in serial]
    assert len({c.features.storage_path for c in parallel}) > 1  # really split over workers
    for a, b in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(a.load_features(), b.load_features())


def test_failed_rerun_with_overwrite_keeps_the_previous_features(japanese_corpus, tmp_path):
    rows = []
    for name, text, wav in read_tsv(japanese_corpus["train_tsv"])[:2]:  # copies: one is damaged
        copy = tmp_path / Path(wav).name
        copy.write_bytes(Path(wav).read_bytes())
        rows.append(f"{name}\t{text}\t{copy}")
    tsv = tmp_path / "two.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    raw = tmp_path / "manifests"
    prepare_dataset(tsv, prefix="keep", subset="train", output_dir=raw)
    first = compute_fbank(raw, tmp_path / "fbank", prefix="keep", subset="train", progress=False)
    before = {c.id: c.load_features() for c in CutSet.from_file(first)}
    # The audio of one cut is damaged between the runs: the rerun must fail...
    saved = copy.read_bytes()
    copy.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(FeatureComputationError):
        compute_fbank(
            raw, tmp_path / "fbank", prefix="keep", subset="train", overwrite=True, progress=False
        )
    copy.write_bytes(saved)
    # ... and leave the first run's manifest and archives readable and unchanged.
    after = {c.id: c.load_features() for c in CutSet.from_file(first)}
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    archives = sorted((tmp_path / "fbank" / "keep_feats_train").iterdir())
    assert len(archives) == 1  # the failed run's partial archive was removed
    # A successful rerun replaces them and removes the old archive.
    compute_fbank(
        raw, tmp_path / "fbank", prefix="keep", subset="train", overwrite=True, progress=False
    )
    assert sorted((tmp_path / "fbank" / "keep_feats_train").iterdir()) != archives


# ---------------------------------------------------------------------------- broken input


@pytest.fixture()
def broken_tsv(japanese_corpus, tmp_path) -> Path:
    """Two good rows, then one broken row of each kind (line numbers 3-7)."""
    good = japanese_corpus["train_tsv"].read_text(encoding="utf-8").splitlines()[:2]
    wav = read_tsv(japanese_corpus["train_tsv"])[0][2]
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    rows = good + [
        f"spk0_0100\tこんにちは。\t{tmp_path / 'missing.wav'}",  # line 3
        f"spk0_0101\t   \t{wav}",  # line 4: empty text
        f"spk0_0102\t!!!\t{wav}",  # line 5: no tokens
        f"spk0_0103\t😀🎉\t{wav}",  # line 6: no tokens
        f"spk0_0104\tこんにちは。\t{junk}",  # line 7: unreadable audio
    ]
    path = tmp_path / "broken.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_broken_rows_fail_by_default_naming_every_line(broken_tsv, tmp_path):
    out = tmp_path / "m"
    with pytest.raises(InvalidRowsError) as err:
        prepare_dataset(broken_tsv, prefix="b", subset="raw", output_dir=out)
    message = str(err.value)
    assert "line 3: audio file not found" in message
    assert "line 4: empty text" in message
    assert "line 7: cannot read audio file" in message and "junk.wav" in message
    assert "line 5" not in message and "line 6" not in message  # their text is fine here
    assert not (out / "b_cuts_raw.jsonl.gz").exists()  # nothing half-written
    assert [r[0] for r in read_tsv(out / "b_raw_rejected.tsv")[1:]] == ["3", "4", "7"]


def test_broken_rows_are_skipped_and_reported_on_request(broken_tsv, tmp_path, caplog):
    out = tmp_path / "m"
    with caplog.at_level(logging.WARNING):
        prepared = prepare_dataset(
            broken_tsv, prefix="b", subset="raw", output_dir=out, on_error="skip"
        )
    assert [r.line for r in prepared.rejected] == [3, 4, 7]
    for line in (3, 4, 7):
        assert f"broken.tsv:{line} skipped" in caplog.text
    cuts = CutSet.from_file(prepared.cuts)
    assert [c.id for c in cuts] == ["spk0_0000", "spk0_0001", "spk0_0102", "spk0_0103"]

    # Texts without a pronounceable character fail tokenisation, named by tsv line.
    tokens_out = out / "b_cuts_all.jsonl.gz"
    with pytest.raises(UntokenizableCutsError) as err:
        prepare_tokens(prepared.cuts, tokens_out, tokenizer="japanese")
    assert "spk0_0102 (tsv line 5): text yields no tokens" in str(err.value)
    assert "spk0_0103 (tsv line 6): text yields no tokens" in str(err.value)
    assert not tokens_out.exists()

    result = prepare_tokens(prepared.cuts, tokens_out, tokenizer="japanese", on_error="skip")
    assert [c.id for c in CutSet.from_file(tokens_out)] == ["spk0_0000", "spk0_0001"]
    report = read_tsv(result.rejected_tsv)
    assert [(r[0], r[1]) for r in report[1:]] == [("spk0_0102", "5"), ("spk0_0103", "6")]


def test_cli_exits_with_a_message_not_a_traceback(broken_tsv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "zipvoice.bin.prepare_dataset", "--tsv-path", str(broken_tsv),
         "--output-dir", str(tmp_path / "m"), "--num-jobs", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "line 3: audio file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_features_or_tokens_name_the_cut_and_manifest(japanese_fbank_manifests, tmp_path):
    raw = japanese_fbank_manifests["raw_manifest_dir"] / "japanese_cuts_raw_dev.jsonl.gz"
    cuts = CutSet.from_file(raw)
    with pytest.raises(CutDataError, match=r"cut spk0_0002 \(manifest raw\.jsonl\).*compute_fbank"):
        SpeechSynthesisDataset(manifest="raw.jsonl")[cuts]
    # On-the-fly features work from audio, but these cuts were never tokenised.
    with pytest.raises(CutDataError, match="spk0_0002.*no tokens.*prepare_tokens"):
        SpeechSynthesisDataset(feature_input_strategy=on_the_fly_features())[cuts]
    batch = SpeechSynthesisDataset(
        feature_input_strategy=on_the_fly_features(), tokenizer=get_tokenizer("japanese")
    )[cuts]
    assert batch["tokens"] == get_tokenizer("japanese").texts_to_tokens(batch["text"])

    dm = datamodule({**japanese_fbank_manifests, "train_cuts": raw})
    with pytest.raises(CutDataError, match="no precomputed features"):
        dm.train_cuts()
    dm = datamodule({**japanese_fbank_manifests, "train_cuts": tmp_path / "nope.jsonl.gz"})
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz: manifest not found"):
        dm.train_cuts()
    dm = datamodule(
        japanese_fbank_manifests, "--dataset", "emilia", "--manifest-dir", str(tmp_path)
    )
    with pytest.raises(FileNotFoundError, match="emilia_cuts_EN.jsonl.gz"):
        dm.train_cuts()


def test_atomic_write_keeps_the_old_file_on_failure_and_the_suffix_for_lhotse(
    japanese_fbank_manifests, tmp_path
):
    target = tmp_path / "cuts.jsonl.gz"
    target.write_text("old", encoding="utf-8")

    def crash_midway(tmp: Path) -> None:
        tmp.write_text("half written", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash_midway)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuts.jsonl.gz"]

    # lhotse picks the format from the temp file's name: it must still end in .jsonl.gz.
    cuts = CutSet.from_file(japanese_fbank_manifests["dev_cuts"])
    atomic_write(target, cuts.to_file)
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert [c.id for c in CutSet.from_file(target)] == [c.id for c in cuts]
