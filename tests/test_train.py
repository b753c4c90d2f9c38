"""End-to-end training with LoRA/DoRA adapters on generated Japanese speech.

The tiny reference-format model of the parity fixtures is the "pretrained" base; the corpus
comes from `tests.data_fixtures` (OpenJTalk speech -> fbank manifests + extended tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PARITY
from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.helpers import ADAPTER_FILES, free_port
from zipvoice.bin.train_zipvoice import get_parser, main
from zipvoice.dataset.config import DataConfig
from zipvoice.models.modules.adapter_folder import fingerprint_state_dict, load_adapter
from zipvoice.models.modules.lora_config import LoraSettings
from zipvoice.models.modules.lora_utils import is_lora_model
from zipvoice.training.callbacks import StopAfterSteps
from zipvoice.training.config import (
    AdapterConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainingConfig,
    TrainingError,
)
from zipvoice.training.model_setup import setup_model
from zipvoice.training.optimizer import build_optimizer
from zipvoice.training.steps import (
    deterministic_loss,
    flow_matching_loss,
    prepare_batch,
    set_batch_count,
)
from zipvoice.training.trainer import run_training
from zipvoice.utils.manifest import read_manifest, verify_folder

MODEL_DIR = PARITY / "zipvoice"


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return torch.load(MODEL_DIR / "model.pt", weights_only=True)["model"]


def user_flags(data: dict, exp_dir: Path, **overrides: object) -> list[str]:
    """The README's LoRA command, scaled down to a few steps on the test corpus."""
    flags: dict[str, object] = {
        "world-size": 1,
        "use-fp16": 1,
        "finetune": 1,
        "checkpoint": MODEL_DIR / "model.pt",
        "use-lora": 1,
        "lora-rank": 32,
        "lora-alpha": 64,
        "use-dora": 1,
        "lora-dropout": 0.05,
        "base-lr": 0.001,
        "num-iters": 4,
        "valid-interval": 2,
        "save-every-n": 2,
        "max-duration": 6,
        "lr-hours": 3800,
        "model-config": MODEL_DIR / "model.json",
        "tokenizer": "japanese",
        "token-file": data["token_file"],
        "dataset": "custom",
        "train-manifest": data["train_cuts"],
        "dev-manifest": data["dev_cuts"],
        "exp-dir": exp_dir,
        "num-workers": 0,
        "tensorboard": 0,
        "log-interval": 1,
    }
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    argv: list[str] = []
    for key, value in flags.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def user_config(data: dict, exp_dir: Path, **overrides: object) -> TrainingConfig:
    """The same run as `user_flags`, built as a TrainingConfig; `overrides` are named by flag
    destination (`num_iters=6`, `lora_rank=16`)."""
    config = TrainingConfig(
        data=DataConfig(
            dataset="custom",
            train_manifest=str(data["train_cuts"]),
            dev_manifest=str(data["dev_cuts"]),
            max_duration=6,
            num_workers=0,
        ),
        model=ModelConfig(
            model_config=str(MODEL_DIR / "model.json"),
            checkpoint=str(MODEL_DIR / "model.pt"),
            tokenizer="japanese",
            token_file=str(data["token_file"]),
            finetune=True,
        ),
        adapter=AdapterConfig(
            use_lora=True, lora=LoraSettings(rank=32, alpha=64, use_dora=True, dropout=0.05)
        ),
        optim=OptimConfig(base_lr=0.001, lr_hours=3800),
        run=RunConfig(
            exp_dir=str(exp_dir),
            world_size=1,
            use_fp16=True,
            num_iters=4,
            valid_interval=2,
            save_every_n=2,
            tensorboard=False,
            log_interval=1,
        ),
    )
    return config.replace(**overrides)


def test_the_config_and_the_cli_flags_describe_the_same_run(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    from_cli = TrainingConfig.from_flags(get_parser().parse_args(user_flags(data, tmp_path)))
    assert from_cli == user_config(data, tmp_path)
    assert from_cli.base_lr == 0.001 and from_cli.optimizer_kind == "adamw"


@pytest.fixture(scope="module")
def user_run(japanese_fbank_manifests, tmp_path_factory, monkeypatch_module) -> Path:
    """The user's command (wandb offline, tensorboard on) through the CLI entry point."""
    exp_dir = tmp_path_factory.mktemp("exp") / "zipvoice_japanese_lora"
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    monkeypatch_module.setenv("NETRC", str(exp_dir.parent / "no-netrc"))
    argv = user_flags(
        japanese_fbank_manifests,
        exp_dir,
        wandb_project="zipvoice-japanese",
        tensorboard=1,
        forgetting_manifest=japanese_fbank_manifests["dev_cuts"],
    )
    assert main(argv) == 0
    return exp_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_cli_trains_and_writes_adapters_checkpoints_and_logs(user_run, base_state):
    exp_dir = user_run
    assert sorted(p.name for p in exp_dir.glob("checkpoint-*.pt")) == [
        "checkpoint-2.pt",
        "checkpoint-4.pt",
    ]
    for name in ("adapter-2", "adapter"):
        assert ADAPTER_FILES <= {p.name for p in (exp_dir / name).iterdir()}
    meta = json.loads((exp_dir / "adapter" / "zipvoice_adapter.json").read_text())
    assert meta["base_fingerprint"] == fingerprint_state_dict(base_state)
    assert meta["step"] == 4 and meta["tokenizer"] == "japanese"
    assert meta["lora"]["rank"] == 32 and meta["lora"]["use_dora"]
    assert meta["vocab_size"] > base_state["embed.weight"].shape[0]  # Japanese rows added
    assert meta["text_encoder_included"]
    assert any((exp_dir / "tensorboard").iterdir())
    assert any((exp_dir / "wandb").glob("offline-run-*"))
    # Manifests: the exp-dir lists its checkpoints, each adapter all its files, one base.
    run_manifest = read_manifest(exp_dir)
    assert sorted(run_manifest["files"]) == [
        "checkpoint-2.pt", "checkpoint-4.pt", "model.json", "tokens.txt"
    ]  # fmt: skip
    for folder in (exp_dir, exp_dir / "adapter"):
        assert verify_folder(folder, hashes=True).hashed > 0
        assert read_manifest(folder)["base_model"]["state_dict_sha256"] == meta["base_fingerprint"]
    assert set(read_manifest(exp_dir / "adapter")["files"]) == ADAPTER_FILES

    checkpoint = torch.load(exp_dir / "checkpoint-4.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert {"optimizer", "scheduler", "sampler", "rng", "model_avg"} <= set(checkpoint)
    decoder_keys = [k for k in checkpoint["model"] if k.startswith("fm_decoder.")]
    assert decoder_keys and all("lora_" in k for k in decoder_keys)  # trainable weights only
    assert "embed.weight" in checkpoint["model"]
    assert set(checkpoint["model_avg"]) == set(checkpoint["model"])

    text_side = load_file(exp_dir / "adapter" / "text_side.safetensors")
    assert any(k.startswith("text_encoder.") for k in text_side)
    log_text = "\n".join(p.read_text() for p in (exp_dir / "log").iterdir())
    assert "trainable" in log_text and "steps/s" in log_text and "ETA" in log_text
    assert "validation loss" in log_text and "forgetting-set loss" in log_text
    assert "--use-fp16 1 ignored" in log_text


def test_saved_adapter_reloads_onto_the_base(user_run, base_state, japanese_fbank_manifests):
    from zipvoice.models.zipvoice import ZipVoice

    config = json.loads((MODEL_DIR / "model.json").read_text())["model"]
    model = ZipVoice(**config, vocab_size=base_state["embed.weight"].shape[0], pad_id=0)
    model.load_state_dict(base_state)
    fingerprint = fingerprint_state_dict(base_state)
    load_adapter(model, user_run / "adapter", base_state_dict_fingerprint=fingerprint)
    assert not is_lora_model(model)
    text_side = load_file(user_run / "adapter" / "text_side.safetensors")
    assert torch.equal(model.embed.weight, text_side["embed.weight"])


def test_exp_dir_of_another_run_is_refused(user_run, japanese_fbank_manifests, caplog):
    with caplog.at_level(logging.ERROR):
        argv = user_flags(japanese_fbank_manifests, user_run, lora_rank=16)
        assert main(argv) == 1
    assert "holds a different run" in caplog.text and "lora_rank: 32 -> 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(user_flags(japanese_fbank_manifests, user_run, resume="never")) == 1
    assert "would overwrite" in caplog.text


def _fixed_batch_run(data, tmp_path, base_state, optimizer: str, steps: int = 20, **extra):
    """Train on one fixed batch; return (loss before, loss after, max |lora_B|, model)."""
    config = user_config(
        data,
        tmp_path,
        optimizer=optimizer,
        warmup_steps=0,
        num_iters=steps,
        max_duration=20,
        lr_schedule="constant",
        **extra,
    )
    from zipvoice.dataset.datamodule import TtsDataModule
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    torch.manual_seed(0)
    tokenizer = get_tokenizer("japanese", config.model.token_file)
    model_json = json.loads(Path(config.model.model_config).read_text())
    setup = setup_model(config, tokenizer.vocab_size, tokenizer.pad_id, model_json)
    model = setup.model
    datamodule = TtsDataModule(config.data, tokenizer=tokenizer, seed=config.run.seed)
    raw = next(iter(datamodule.train_dataloaders(datamodule.train_cuts())))
    batch = prepare_batch(raw, tokenizer, config.model.feat_scale, torch.device("cpu"))
    optimizer_, scheduler, _ = build_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    before = deterministic_loss(model, batch, seed=1)
    for step in range(steps):
        set_batch_count(model, step + 100000)
        scheduler.step_batch(step)
        loss = flow_matching_loss(model, batch, condition_drop_ratio=0.0)
        loss.backward()
        if optimizer == "adamw":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer_.step()
        optimizer_.zero_grad()
    after = deterministic_loss(model, batch, seed=1)
    lora_b = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
    return before, after, lora_b, model


def test_adapter_training_lowers_the_loss_and_keeps_the_base_bit_identical(
    japanese_fbank_manifests, tmp_path, base_state
):
    data = japanese_fbank_manifests
    before, after, lora_b, model = _fixed_batch_run(data, tmp_path / "a", base_state, "adamw")
    print(
        f"\nAdamW (default): fixed-batch loss {before:.4f} -> {after:.4f}, max|lora_B| {lora_b:.2e}"
    )
    assert after < 0.7 * before  # measured 4.08 -> 1.50 in 20 steps
    assert lora_b > 1e-3
    decoder = model.fm_decoder.get_base_model().state_dict()
    for key, value in decoder.items():
        if "lora_" in key:
            continue
        original = base_state["fm_decoder." + key.replace(".base_layer.", ".")]
        assert torch.equal(value, original), key

    # ScaledAdam scales each step by the tensor's RMS: lora_B starts at zero, so its steps sit
    # at the 1e-5 RMS floor and the decoder adapters barely move (only the text side learns).
    s_before, s_after, s_lora_b, _ = _fixed_batch_run(
        data, tmp_path / "s", base_state, "scaledadam", steps=10, base_lr=0.02
    )
    print(
        f"ScaledAdam: fixed-batch loss {s_before:.4f} -> {s_after:.4f}, max|lora_B| {s_lora_b:.2e}"
    )
    assert s_before == pytest.approx(before)
    assert s_lora_b < 0.01 * lora_b  # measured 2e-6 vs 2e-2


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    common = dict(num_iters=6, save_every_n=3, valid_interval=3, use_dora=1)
    run_training(user_config(data, tmp_path / "straight", **common))
    interrupted = user_config(data, tmp_path / "killed", **common)
    # "Killed" after step 5: the newest checkpoint is 3.
    run_training(interrupted, callbacks=[StopAfterSteps(5)])
    assert not (tmp_path / "killed" / "adapter").exists()
    run_training(interrupted)
    for name in ("adapter_model.safetensors", "text_side.safetensors"):
        a = load_file(tmp_path / "straight" / "adapter" / name)
        b = load_file(tmp_path / "killed" / "adapter" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    log_text = "\n".join(p.read_text() for p in (tmp_path / "killed" / "log").iterdir())
    assert "resuming from" in log_text and "checkpoint-3.pt" in log_text


def test_two_process_ddp_on_cpu(japanese_fbank_manifests, tmp_path):
    config = user_config(
        japanese_fbank_manifests,
        tmp_path,
        world_size=2,
        master_port=free_port(),
        num_iters=2,
        save_every_n=0,
        valid_interval=0,
        max_duration=3,
    )
    assert run_training(config) is None
    checkpoint = torch.load(tmp_path / "checkpoint-2.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_non_finite_loss_skips_the_batch_then_stops(japanese_fbank_manifests, tmp_path, caplog):
    from zipvoice.models.zipvoice import ZipVoice

    real_forward = ZipVoice.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] in poisoned else loss

    data = japanese_fbank_manifests
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ZipVoice, "forward", sometimes_nan)
        poisoned = {2}
        with caplog.at_level(logging.WARNING):
            args = user_flags(data, tmp_path / "one", num_iters=3, valid_interval=0)
            assert main(args) == 0
        assert "non-finite loss" in caplog.text and "cuts: " in caplog.text
        assert (tmp_path / "one" / "adapter").is_dir()

        caplog.clear()
        calls["n"] = 0
        poisoned = set(range(1, 100))
        config = user_config(
            data, tmp_path / "all", num_iters=3, valid_interval=0, max_bad_batches=1
        )
        with pytest.raises(TrainingError, match="--max-bad-batches 1"):
            run_training(config)


def test_distill_checkpoint_trains_adapters_with_the_flow_matching_loss(
    japanese_fbank_manifests, tmp_path
):
    config = user_config(
        japanese_fbank_manifests,
        tmp_path,
        distill=True,
        checkpoint=str(PARITY / "distill" / "model.pt"),
        model_config=str(PARITY / "distill" / "model.json"),
    )
    from zipvoice.dataset.datamodule import TtsDataModule
    from zipvoice.models.zipvoice_distill import ZipVoiceDistill
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("japanese", config.model.token_file)
    model_json = json.loads(Path(config.model.model_config).read_text())
    model = setup_model(config, tokenizer.vocab_size, tokenizer.pad_id, model_json).model
    assert isinstance(model, ZipVoiceDistill)
    datamodule = TtsDataModule(config.data, tokenizer=tokenizer, seed=config.run.seed)
    raw = next(iter(datamodule.train_dataloaders(datamodule.train_cuts())))
    batch = prepare_batch(raw, tokenizer, config.model.feat_scale, torch.device("cpu"))
    loss = flow_matching_loss(model, batch, condition_drop_ratio=0.0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    # The guidance-scale embedding is in the graph (fed 0), so it shapes the loss.
    assert any("guidance_scale_embed" in n for n, _ in model.named_parameters())


def test_a_trainable_predicate_narrows_what_the_configuration_trains(
    japanese_fbank_manifests, tmp_path
):
    from zipvoice.tokenizer.tokenizer import get_tokenizer

    config = user_config(japanese_fbank_manifests, tmp_path)
    tokenizer = get_tokenizer("japanese", config.model.token_file)
    model_json = json.loads(Path(config.model.model_config).read_text())

    def trains(trainable=None) -> set[str]:
        setup = setup_model(
            config, tokenizer.vocab_size, tokenizer.pad_id, model_json, trainable=trainable
        )
        return {n for n, p in setup.model.named_parameters() if p.requires_grad}

    default = trains()
    assert any(n.startswith("text_encoder.") for n in default)
    narrowed = trains(lambda name: not name.startswith("text_encoder."))
    assert narrowed == {n for n in default if not n.startswith("text_encoder.")}
    assert any("lora_" in n for n in narrowed) and "embed.weight" in narrowed
    # Narrowing only: a predicate that accepts everything cannot unfreeze the base decoder.
    assert trains(lambda name: True) == default
