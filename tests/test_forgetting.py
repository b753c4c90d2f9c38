"""Against forgetting: replay batches, distillation from the start weights, partial freezing,
and best-checkpoint selection (docs/lora.md)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lhotse import CutSet, Features, MonoCut, SupervisionSegment
from lhotse.features.io import NumpyFilesWriter
from safetensors.torch import load_file

from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.helpers import perturb_adapters
from tests.test_train import MODEL_DIR, user_config
from zipvoice.dataset.config import DataConfig
from zipvoice.dataset.datamodule import TtsDataModule
from zipvoice.dataset.replay import load_replay_cuts
from zipvoice.models.loader import load_model_config
from zipvoice.tokenizer.tokenizer import get_tokenizer
from zipvoice.training.callbacks import StopAfterSteps
from zipvoice.training.config import TrainingError
from zipvoice.training.distillation import ForgettingObjective, start_weights
from zipvoice.training.model_setup import setup_model
from zipvoice.training.selection import combined_score, parse_select_metric
from zipvoice.training.steps import prepare_batch, set_batch_count
from zipvoice.training.trainer import Trainer, run_training
from zipvoice.utils.checkpoint import load_checkpoint_state
from zipvoice.utils.feature import N_MELS, SAMPLING_RATE

FRAME_SHIFT = 256 / SAMPLING_RATE


def synthetic_cuts(folder: Path, prefix: str, count: int, seed: int, tokens: bool) -> Path:
    """`count` cuts of 0.5-2.5 s with random 100-dim features; tokens stored, or text only."""
    rng = random.Random(seed)
    cuts = []
    with NumpyFilesWriter(folder / f"{prefix}_feats") as writer:
        for i in range(count):
            frames = rng.randint(47, 234)
            duration = frames * FRAME_SHIFT
            key = writer.write(f"{prefix}-{i}", np.zeros((frames, N_MELS), np.float32))
            features = Features(
                type="vocos-fbank", num_frames=frames, num_features=N_MELS,
                frame_shift=FRAME_SHIFT, sampling_rate=SAMPLING_RATE, start=0.0,
                duration=duration, storage_type=writer.name, storage_path=str(writer.storage_path),
                storage_key=key,
            )  # fmt: skip
            text = "abc"[: 1 + i % 3]
            custom = {"tokens": list(text)} if tokens else None
            sup = SupervisionSegment(f"{prefix}-{i}", f"{prefix}-{i}", 0.0, duration, text=text,
                                     custom=custom)  # fmt: skip
            cuts.append(MonoCut(f"{prefix}-{i}", 0.0, duration, 0, features=features,
                                supervisions=[sup]))  # fmt: skip
    path = folder / f"{prefix}_cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_replay_takes_the_asked_share_of_every_epochs_duration(tmp_path, ratio):
    train = synthetic_cuts(tmp_path, "ft", 300, seed=1, tokens=True)
    # Replay cuts carry text only: the replay tokenizer (not the run's) tokenises them.
    replay = synthetic_cuts(tmp_path, "rp", 120, seed=2, tokens=False)
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("_\t0\na\t1\nb\t2\nc\t3\n", encoding="utf-8")
    data = DataConfig(
        dataset="custom", train_manifest=str(train), dev_manifest=str(train), max_duration=20,
        num_workers=0, min_len=0.1, replay_manifest=str(replay), replay_ratio=ratio,
        replay_tokenizer="simple",
    )  # fmt: skip
    tokenizer = get_tokenizer("simple", token_file)
    module = TtsDataModule(data, tokenizer=tokenizer, seed=3)
    replay_cuts = load_replay_cuts(data, tokenizer.token2id, module.check_first_cut)
    loader = module.train_dataloaders(module.train_cuts(), replay_cuts=replay_cuts)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        frames = {True: 0, False: 0}
        seen: list[str] = []
        replay_seen: set[str] = set()
        for batch in loader:
            for is_replay, length, cut_id, tokens in zip(
                batch["replay"].tolist(), batch["features_lens"].tolist(), batch["cut_ids"],
                batch["tokens"], strict=True,
            ):  # fmt: skip
                frames[is_replay] += length
                assert cut_id.startswith("rp-" if is_replay else "ft-")
                (replay_seen.add if is_replay else seen.append)(cut_id.split("_repeat")[0])
                assert tokens == list("abc"[: len(tokens)])
        share = frames[True] / (frames[True] + frames[False])
        print(f"\nratio {ratio}, epoch {epoch}: replay share of frames {share:.3f}")
        assert share == pytest.approx(ratio, abs=0.02)
        # An epoch is one pass over the fine-tuning cuts (each bucket drops its last,
        # incomplete batch).
        assert len(seen) == len(set(seen)) and len(seen) >= 240
        assert len(replay_seen) > 30


def test_replay_tokens_unknown_to_the_token_file_are_refused(tmp_path):
    train = synthetic_cuts(tmp_path, "ft", 12, seed=1, tokens=True)
    replay = synthetic_cuts(tmp_path, "rp", 12, seed=2, tokens=False)
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("_\t0\nx\t1\n", encoding="utf-8")
    data = DataConfig(replay_manifest=str(replay), replay_tokenizer="simple", min_len=0.1,
                      train_manifest=str(train))  # fmt: skip
    module = TtsDataModule(data, tokenizer=None, seed=3)
    tokenizer = get_tokenizer("simple", token_file)
    with pytest.raises(ValueError, match="none of its tokens are in the token file"):
        load_replay_cuts(data, tokenizer.token2id, module.check_first_cut)


def _model_and_batch(data, tmp_path, **overrides):
    config = user_config(data, tmp_path, max_duration=20, **overrides)
    tokenizer = get_tokenizer("japanese", config.model.token_file)
    model_json = load_model_config(config.model.model_config)
    torch.manual_seed(0)
    model = setup_model(config, tokenizer.vocab_size, tokenizer.pad_id, model_json).model
    module = TtsDataModule(config.data, tokenizer=tokenizer, seed=0)
    raw = next(iter(module.train_dataloaders(module.train_cuts())))
    batch = prepare_batch(raw, tokenizer, config.model.feat_scale, torch.device("cpu"))
    batch.replay = torch.arange(len(batch.tokens)) % 2 == 0
    model.train()
    set_batch_count(model, 100000)
    return model, batch


@pytest.mark.parametrize("use_lora", [True, False])
def test_distillation_is_zero_at_the_start_and_trains_only_trainables(
    japanese_fbank_manifests, tmp_path, use_lora
):
    model, batch = _model_and_batch(japanese_fbank_manifests, tmp_path, use_lora=use_lora)
    objective = ForgettingObjective(1.0, "all", start_weights(model))
    for kd_on in ("replay", "prompt", "all"):
        objective.kd_on = kd_on
        _, kd, scalars = objective.terms(model, batch, condition_drop_ratio=0.2)
        # Same weights, noise, masks, dropout and skip draws: exactly zero, not merely small.
        assert kd is not None and float(kd.detach()) == 0.0, kd_on
    with torch.no_grad():
        if use_lora:
            perturb_adapters(model, seed=1)
        else:
            model.fm_decoder.encoders[0].layers[0].self_attn1.in_proj.weight.mul_(1.5)
    _, kd, _ = objective.terms(model, batch, condition_drop_ratio=0.2)
    assert float(kd) > 0
    kd.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert reached and reached <= trainable
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in reached)
    assert all(t.grad is None for t in objective.teacher.values())


def test_distillation_and_replay_in_a_training_run(japanese_fbank_manifests, tmp_path, caplog):
    data = japanese_fbank_manifests
    seen: list[dict[str, float]] = []

    class Terms:
        def on_step_end(self, trainer):
            seen.append(dict(trainer.last_terms))
            return False

        def on_validation(self, trainer, values):
            pass

    config = user_config(
        data, tmp_path, num_iters=2, kd_weight=0.5, replay_manifest=str(data["dev_cuts"]),
        replay_ratio=0.5, max_duration=12, valid_interval=0, save_every_n=0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="zipvoice.train"):
        run_training(config, callbacks=[Terms()])
    assert len(seen) == 2
    for terms in seen:
        assert {"train/kd_loss", "train/replay_loss", "train/replay_share"} <= set(terms)
        assert 0 < terms["train/replay_share"] < 1
    assert seen[0]["train/kd_loss"] == 0.0 and seen[1]["train/kd_loss"] > 0
    assert "distillation: weight 0.5 on the replay region" in caplog.text


def test_resume_with_replay_and_distillation_ends_like_an_uninterrupted_run(
    japanese_fbank_manifests, tmp_path
):
    data = japanese_fbank_manifests
    common = dict(
        num_iters=6, save_every_n=3, valid_interval=3, kd_weight=1.0, kd_on="prompt",
        replay_manifest=str(data["dev_cuts"]), replay_ratio=0.4, max_duration=10,
    )  # fmt: skip
    run_training(user_config(data, tmp_path / "straight", **common))
    interrupted = user_config(data, tmp_path / "killed", **common)
    run_training(interrupted, callbacks=[StopAfterSteps(5)])
    run_training(interrupted)
    for name in ("adapter_model.safetensors", "text_side.safetensors"):
        a = load_file(tmp_path / "straight" / "adapter" / name)
        b = load_file(tmp_path / "killed" / "adapter" / name)
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_frozen_patterns_stay_bit_identical_in_full_fine_tuning(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    frozen = "fm_decoder.encoders.0,text_encoder.*"
    config = user_config(
        data, tmp_path / "run", use_lora=False, num_iters=3, freeze_modules=frozen,
        valid_interval=0, save_every_n=0,
    )  # fmt: skip
    run_training(config)
    base = load_checkpoint_state(str(MODEL_DIR / "model.pt"))
    trained = load_checkpoint_state(str(tmp_path / "run" / "finetuned" / "model.pt"))
    is_frozen = [k for k in base if k.startswith(("fm_decoder.encoders.0.", "text_encoder."))]
    assert is_frozen
    for key in is_frozen:
        assert torch.equal(trained[key], base[key]), key
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert any(k.startswith("fm_decoder.encoders.1.") for k in changed)


@pytest.mark.parametrize("flag", ["freeze_modules", "trainable_modules"])
def test_a_pattern_that_names_no_parameter_is_an_error_naming_it(
    japanese_fbank_manifests, tmp_path, flag
):
    config = user_config(japanese_fbank_manifests, tmp_path, use_lora=False,
                         **{flag: "fm_decoder.encoders.0,fm_decodr.*"})  # fmt: skip
    with pytest.raises(TrainingError, match=r"'fm_decodr\.\*' matches no parameter"):
        Trainer(config).fit()


def test_select_metric_parsing():
    assert parse_select_metric("valid_loss + 0.5*forgetting_loss") == {
        "valid_loss": 1.0,
        "forgetting_loss": 0.5,
    }
    assert parse_select_metric("valid_loss-0.2*sim+forgetting_loss") == {
        "valid_loss": 1.0, "sim": -0.2, "forgetting_loss": 1.0,
    }  # fmt: skip
    for bad in ("valid_loss*2", "2*", "", "valid_loss+"):
        with pytest.raises(ValueError, match="cannot read it"):
            parse_select_metric(bad)
    with pytest.raises(ValueError, match="needs speaker_sim"):
        combined_score({"speaker_sim": 1.0}, {"valid_loss": 1.0}, "speaker_sim")


class ScriptedLosses(Trainer):
    """The dev and forgetting losses come from a script, so the test knows the best step."""

    script = {"valid": [5.0, 4.0, 3.0, 2.0, 1.0], "forgetting": [0.0, 0.5, 0.6, 2.0, 3.0]}

    def _dev_loss(self, loader) -> float:
        kind = "valid" if loader is self.dev_dl else "forgetting"
        return self.script[kind][self.state.step]


@pytest.mark.parametrize("use_lora", [True, False])
def test_best_checkpoint_is_the_step_with_the_best_combined_score(
    japanese_fbank_manifests, tmp_path, caplog, use_lora
):
    data = japanese_fbank_manifests
    config = user_config(
        data, tmp_path, num_iters=4, valid_interval=1, save_every_n=0, use_lora=use_lora,
        forgetting_manifest=str(data["dev_cuts"]), select_metric="valid_loss+2*forgetting_loss",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="zipvoice.train"):
        ScriptedLosses(config).fit()
    # Scores 5, 5, 4.2, 6, 7: step 2 is the best (step 1 ties step 0 and does not replace it).
    record = json.loads((tmp_path / "best.json").read_text())
    assert record["step"] == 2 and record["score"] == pytest.approx(4.2)
    assert "new best checkpoint at step 2" in caplog.text
    assert "new best checkpoint at step 1" not in caplog.text
    best = tmp_path / "best"
    if use_lora:
        saved = json.loads((best / "zipvoice_adapter.json").read_text())
        assert saved["step"] == 2 or saved.get("extra", {}).get("step") == 2
    else:
        assert (best / "model.pt").is_file() and (best / "model.json").is_file()


def test_replay_and_distillation_under_two_process_ddp(japanese_fbank_manifests, tmp_path):
    from tests.helpers import free_port

    data = japanese_fbank_manifests
    config = user_config(
        data, tmp_path, world_size=2, master_port=free_port(), num_iters=2, save_every_n=0,
        valid_interval=0, max_duration=8, kd_weight=1.0, replay_ratio=0.4,
        replay_manifest=str(data["dev_cuts"]),
    )  # fmt: skip
    assert run_training(config) is None
    checkpoint = torch.load(tmp_path / "checkpoint-2.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["sampler"]["samplers"]) == 2
    log_text = "\n".join(p.read_text() for p in (tmp_path / "log").iterdir())
    assert "distillation: weight 1 on the replay region" in log_text
