"""Upstream parity: averaging, schedules, upstream's Python names and torchrun (docs/upstream.md).

The tiny reference-format model of the parity fixtures stands in for the released one; the
training runs use the generated Japanese corpus of `tests.data_fixtures`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PARITY, REPO
from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.helpers import free_port
from tests.test_train import user_config, user_flags
from zipvoice.bin.generate_averaged_model import main as average_main
from zipvoice.models.loader import build_model, load_model_config
from zipvoice.tokenizer.tokenizer import SimpleTokenizer
from zipvoice.training.optimizer import build_optimizer
from zipvoice.training.trainer import run_training
from zipvoice.utils import checkpoint as upstream_ckpt
from zipvoice.utils.common import AttributeDict, MetricsTracker, str2bool
from zipvoice.utils.lr_scheduler import Eden, FixedLRScheduler

MODEL_DIR = PARITY / "zipvoice"


def tiny_model() -> torch.nn.Module:
    tokens = SimpleTokenizer(PARITY / "tokens.txt")
    return build_model(
        load_model_config(MODEL_DIR / "model.json"), tokens.vocab_size, tokens.pad_id
    )


def upstream_run(exp_dir: Path, steps=(10, 20, 30), period: int = 10) -> list[dict]:
    """An upstream-layout exp-dir: checkpoint-N.pt written by upstream's save_checkpoint
    signature, with the running average upstream's update_averaged_model keeps."""
    exp_dir.mkdir(parents=True)
    shutil.copy(MODEL_DIR / "model.json", exp_dir / "model.json")
    shutil.copy(PARITY / "tokens.txt", exp_dir / "tokens.txt")
    torch.manual_seed(0)
    model = tiny_model()
    model_avg = tiny_model().to(torch.float64)
    model_avg.load_state_dict(model.state_dict())
    weights = []
    for step in range(period, steps[-1] + 1, period):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        params = AttributeDict(batch_idx_train=step, average_period=period, cur_epoch=1)
        upstream_ckpt.update_averaged_model(params, model, model_avg)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        if step in steps:
            upstream_ckpt.save_checkpoint_with_global_batch_idx(
                exp_dir, step, model, model_avg=model_avg, params=params
            )
    return weights


def mean_of(states: list[dict]) -> dict:
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]
        if torch.is_floating_point(states[0][k])
    }  # fmt: skip


def test_averaging_n_checkpoints_equals_the_mean_of_their_weights(tmp_path):
    weights = upstream_run(tmp_path / "exp")
    assert average_main(
        ["--iter", "30", "--avg", "3", "--use-averaged-model", "0", "--exp-dir",
         str(tmp_path / "exp")]
    ) == 0  # fmt: skip
    averaged = torch.load(tmp_path / "exp" / "iter-30-avg-3.pt", weights_only=True)["model"]
    expected = mean_of(weights)
    for key, value in expected.items():
        assert torch.allclose(averaged[key].double(), value, atol=1e-6), key
    last = weights[-1]["embed.weight"].double()
    assert not torch.allclose(averaged["embed.weight"].double(), last)


def test_the_running_average_gives_the_mean_over_the_range(tmp_path):
    """upstream's --iter 30 --avg 2: every average-period step in (10, 30], i.e. steps 20, 30."""
    weights = upstream_run(tmp_path / "exp")
    average_main(["--iter", "30", "--avg", "2", "--exp-dir", str(tmp_path / "exp")])
    averaged = torch.load(tmp_path / "exp" / "iter-30-avg-2.pt", weights_only=True)["model"]
    for key, value in mean_of(weights[1:]).items():
        assert torch.allclose(averaged[key].double(), value, atol=1e-5), key
    with pytest.raises(SystemExit, match="needs 4 checkpoints"):
        average_main(["--iter", "30", "--avg", "3", "--exp-dir", str(tmp_path / "exp")])


def test_upstream_checkpoint_functions_with_upstream_arguments(tmp_path):
    upstream_run(tmp_path / "exp")
    exp = tmp_path / "exp"
    assert [Path(p).name for p in upstream_ckpt.find_checkpoints(exp)] == [
        "checkpoint-30.pt", "checkpoint-20.pt", "checkpoint-10.pt"]  # fmt: skip
    assert len(upstream_ckpt.find_checkpoints(exp, iteration=-20)) == 2
    model, model_avg = tiny_model(), tiny_model()
    rest = upstream_ckpt.load_checkpoint(
        filename=exp / "checkpoint-30.pt", model=model, model_avg=model_avg, strict=True
    )
    assert rest["batch_idx_train"] == 30 and "model" not in rest and "model_avg" not in rest
    start_end = upstream_ckpt.average_checkpoints_with_averaged_model(
        filename_start=exp / "checkpoint-10.pt", filename_end=exp / "checkpoint-30.pt"
    )
    assert set(start_end) == set(model.state_dict())
    upstream_ckpt.remove_checkpoints(out_dir=exp, topk=1)
    assert [Path(p).name for p in upstream_ckpt.find_checkpoints(exp)] == ["checkpoint-30.pt"]
    # The project's two-argument form still writes any object atomically.
    upstream_ckpt.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "plain.pt")
    assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=True)["model"]["w"],
                       torch.ones(2))  # fmt: skip


def test_upstream_common_and_scheduler_names():
    params = AttributeDict({"exp_dir": Path("exp")})
    params.batch_idx_train = 3
    assert params["batch_idx_train"] == 3 and "exp" in str(params)
    with pytest.raises(AttributeError):
        _ = params.missing
    tracker = MetricsTracker()
    tracker["frames"], tracker["loss"] = 10, 5.0
    total = tracker + tracker
    assert total["frames"] == 20 and dict(total.norm_items())["loss"] == 0.5
    assert str2bool("yes") is True and str2bool("0") is False
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    eden = Eden(optimizer, lr_batches=100, lr_epochs=2, warmup_batches=0)
    eden.step_batch(100)
    eden.step_epoch(2)
    assert eden.get_last_lr()[0] == pytest.approx(0.1 * 2**-0.25 * 2**-0.25)
    fixed = FixedLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    fixed.step_batch(10000)
    fixed.step_epoch(5)
    assert fixed.get_last_lr() == [0.1]


# ---------------------------------------------------------------- schedules


def test_schedules_follow_upstream(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    full = dict(use_lora=False, optimizer="auto", base_lr=None, lr_hours=0, lr_epochs=2)
    model = tiny_model()
    # --finetune 1 with ScaledAdam: a constant rate (upstream's FixedLRScheduler).
    _, scheduler, kind = build_optimizer(model, user_config(data, tmp_path, **full))
    assert kind == "scaledadam" and isinstance(scheduler, FixedLRScheduler)
    scheduler.step_batch(0)
    first = scheduler.get_last_lr()[0]
    scheduler.step_batch(50000)
    scheduler.step_epoch(7)
    assert first == scheduler.get_last_lr()[0] == 0.02
    # --finetune 0: Eden, whose epoch factor --lr-epochs sets.
    _, eden, _ = build_optimizer(model, user_config(data, tmp_path, finetune=False, **full))
    eden.step_batch(500)
    at_epoch0 = eden.get_last_lr()[0]
    eden.step_epoch(2)
    assert eden.get_last_lr()[0] == pytest.approx(at_epoch0 * 2**-0.25)
    # AdamW (adapters) keeps the project's warm-up.
    _, warm, kind = build_optimizer(
        model, user_config(data, tmp_path, use_lora=False, optimizer="adamw", warmup_steps=4)
    )
    assert kind == "adamw" and warm.get_last_lr()[0] == pytest.approx(1e-3 / 5)


def test_adamw_runs_fused_on_the_cpu_and_steps_like_the_per_tensor_loop(
    japanese_fbank_manifests, tmp_path
):
    config = user_config(
        japanese_fbank_manifests, tmp_path, use_lora=False, optimizer="adamw", warmup_steps=0
    )
    model = tiny_model()
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    fused, _, kind = build_optimizer(model, config)
    group = fused.param_groups[0]
    assert kind == "adamw" and group["fused"] is True
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    loop = torch.optim.AdamW(
        twin_params, lr=group["lr"], weight_decay=group["weight_decay"], foreach=False
    )
    start = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(params, twin_params, strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    moved = max(float((a - b).abs().max()) for a, b in zip(params, twin_params, strict=True))
    assert moved < 1e-6  # measured 0 to 2.4e-7: float rounding only
    assert min(float((a - a0).abs().max()) for a, a0 in zip(params, start, strict=True)) > 1e-4


def test_validation_cadence_follows_upstream(japanese_fbank_manifests, tmp_path):
    data = japanese_fbank_manifests
    config = user_config(data, tmp_path, valid_interval=-1, save_every_n=7)
    assert config.valid_interval == 7  # upstream: valid_interval = save_every_n
    assert config.replace(valid_interval=3).valid_interval == 3
    assert config.replace(valid_by_epoch=True).valid_interval == 0


def test_lr_epochs_steps_per_epoch_in_a_full_run(japanese_fbank_manifests, tmp_path):
    """Two epochs of full training with Eden: the second starts with step_epoch(1)."""
    from zipvoice.training.callbacks import RecordLosses

    data = japanese_fbank_manifests
    record = RecordLosses()
    config = user_config(
        data, tmp_path, use_lora=False, finetune=False, optimizer="scaledadam", base_lr=0.02,
        lr_hours=0, lr_epochs=1, num_iters=0, num_epochs=2, save_every_n=0, valid_interval=0,
        valid_by_epoch=True, max_duration=40, avg=0, use_fp16=False,
    )  # fmt: skip
    run_training(config, callbacks=[record])
    newest = max(tmp_path.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    saved = torch.load(newest, weights_only=True)
    assert saved["scheduler"]["epoch"] == 1  # epoch 2 started with step_epoch(1)
    # --valid-by-epoch 1: one validation per epoch start, plus the final one.
    assert len(record.valid) == 3


# ---------------------------------------------------------------- the trainer's average


def test_trainer_writes_the_averaged_adapter_and_it_loads(japanese_fbank_manifests, tmp_path):
    from zipvoice.inference.torch_backend import load_model_for_inference

    data = japanese_fbank_manifests
    exp = tmp_path / "exp"
    config = user_config(data, exp, num_iters=4, save_every_n=1, valid_interval=0,
                         average_period=1, avg=2, use_dora=False)  # fmt: skip
    run_training(config)
    last, before = load_file(exp / "adapter-4" / "adapter_model.safetensors"), load_file(
        exp / "adapter-3" / "adapter_model.safetensors")  # fmt: skip
    averaged = load_file(exp / "adapter" / "adapter_model.safetensors")
    moved = 0
    for key, value in averaged.items():
        assert torch.allclose(value, (last[key] + before[key]) / 2, atol=1e-6), key
        moved += not torch.equal(last[key], before[key])
    assert moved > 0
    from tests.helpers import make_model_dir

    model_dir = make_model_dir(tmp_path / "released", "zipvoice")
    model, _, meta = load_model_for_inference(model_dir=model_dir, lora_path=exp / "adapter")
    assert meta and not model.training
    # generate_averaged_model over the same range writes the same adapter.
    average_main(["--iter", "4", "--avg", "2", "--exp-dir", str(exp)])
    again = load_file(exp / "iter-4-avg-2" / "adapter_model.safetensors")
    for key, value in averaged.items():
        assert torch.allclose(again[key], value, atol=1e-6), key


# ---------------------------------------------------------------- torchrun


def _torchrun_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def _train_argv(data: dict, exp: Path) -> list[str]:
    return ["-m", "zipvoice.bin.train_zipvoice"] + user_flags(
        data, exp, num_iters=2, save_every_n=0, valid_interval=0, max_duration=3, use_fp16=0
    )


def _check_one_writer(exp: Path) -> None:
    checkpoint = torch.load(exp / "checkpoint-2.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2
    assert (exp / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list(exp.glob("checkpoint-*.pt"))) == 1
    config = json.loads((exp / "run_config.json").read_text())
    assert config["args"]["exp_dir"] == str(exp)


def test_torchrun_two_ranks_one_writer(japanese_fbank_manifests, tmp_path):
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    done = subprocess.run(cmd + _train_argv(japanese_fbank_manifests, exp), env=_torchrun_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _check_one_writer(exp)
    assert "rank 1/2" in done.stderr and "rank 0/2" in done.stderr


def test_two_node_rendezvous_on_localhost(japanese_fbank_manifests, tmp_path):
    exp, port = tmp_path / "exp", str(free_port())
    # Each launcher writes to its own file: with pipes read one after the other, the second
    # node could block on a full pipe while the first waits for it at the rendezvous.
    logs = [tmp_path / f"node-{node}.log" for node in (0, 1)]
    launchers = []
    for node, log in zip((0, 1), logs, strict=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", port]  # fmt: skip
        with open(log, "w") as out:
            launchers.append(
                subprocess.Popen(
                    cmd + _train_argv(japanese_fbank_manifests, exp),
                    env=_torchrun_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [launcher.wait(timeout=600) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log.read_text()[-3000:]
    _check_one_writer(exp)


# ---------------------------------------------------------------- infer --raw-evaluation


def test_raw_evaluation_feeds_the_inputs_as_given(tmp_path):
    """--raw-evaluation: one piece of text, no added punctuation, the prompt's silences kept."""
    import numpy as np
    import soundfile as sf

    from zipvoice.bin.infer_zipvoice import get_parser
    from zipvoice.inference.generation import Synthesizer, make_text_functions

    sr = 24000
    t = np.arange(int(1.5 * sr)) / sr
    voiced = 0.05 * np.sin(2 * np.pi * 220 * t)
    silence = np.zeros(sr, dtype=np.float64)
    prompt_wav = tmp_path / "prompt.wav"
    sf.write(prompt_wav, np.concatenate([silence, voiced, silence]).astype(np.float32), sr)
    text_to_tokens, tokens_to_ids = make_text_functions("simple", PARITY / "tokens.txt", "en-us")
    calls: list[tuple[list[list[int]], list[int], int]] = []

    def sample(batch, prompt_ids, prompt_features):
        calls.append((batch, prompt_ids, prompt_features.shape[0]))
        return [np.zeros((prompt_features.shape[1], 5), np.float32) for _ in batch]

    vocode = lambda mel: np.zeros(mel.shape[-1] * 256, np.float32)  # noqa: E731
    text = "a b c d e f g h, i j k l m n o p, " * 12
    for raw in (False, True):
        synth = Synthesizer(text_to_tokens, tokens_to_ids, sample, vocode, raw_evaluation=raw)
        synth.synthesize(text, prompt_wav, "hello there")
    (cooked_batches, cooked_prompt, cooked_frames) = calls[0][:3]
    raw_calls = calls[1:]
    assert len(raw_calls) == 1 and len(raw_calls[0][0]) == 1  # one batch, one piece
    assert raw_calls[0][0][0] == tokens_to_ids([text_to_tokens(text)])[0]
    assert raw_calls[0][1] == tokens_to_ids([text_to_tokens("hello there")])[0]
    assert cooked_prompt == tokens_to_ids([text_to_tokens("hello there.")])[0]
    assert raw_calls[0][2] > cooked_frames + 50  # ~2 s of edge silence kept (~94 frames/s)
    assert get_parser().parse_args(["--raw-evaluation", "1"]).raw_evaluation is True


# ---------------------------------------------------------------- data preparation


def test_data_preparation_skips_finished_work_and_refuses_other_outputs(
    japanese_fbank_manifests, tmp_path, caplog
):
    """A rerun with the same inputs and settings skips each step (upstream's behaviour); an
    output of other inputs or settings is still refused."""
    import logging

    from lhotse import CutSet

    from zipvoice.bin import compute_fbank as fbank_bin
    from zipvoice.bin import prepare_tokens as tokens_bin
    from zipvoice.dataset.fbank import compute_fbank
    from zipvoice.dataset.tokens import prepare_tokens

    assert tokens_bin.get_parser().parse_args(["--input-file", "a", "--output-file", "b"]
                                              ).tokenizer == "emilia"  # fmt: skip
    raw = japanese_fbank_manifests["raw_manifest_dir"] / "japanese_cuts_raw_train.jsonl.gz"
    manifests = tmp_path / "manifests"
    out = manifests / "ja_cuts_train.jsonl.gz"
    prepare_tokens(raw, out, tokenizer="japanese")
    written = out.read_bytes()
    with caplog.at_level(logging.INFO):
        again = prepare_tokens(raw, out, tokenizer="japanese")
    assert "already done" in caplog.text and out.read_bytes() == written
    assert again.num_cuts == len(CutSet.from_file(out))
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        prepare_tokens(raw, out, tokenizer="simple")
    # Features: the same; then split pieces, upstream's naming, one of them missing.
    compute_fbank(manifests, tmp_path / "fbank", prefix="ja", subset="train", progress=False)
    feats = (tmp_path / "fbank" / "ja_cuts_train.jsonl.gz").read_bytes()
    fbank_bin.main(["--source-dir", str(manifests), "--dest-dir", str(tmp_path / "fbank"),
                    "--prefix", "ja", "--subset", "train", "--num-jobs", "1"])  # fmt: skip
    assert (tmp_path / "fbank" / "ja_cuts_train.jsonl.gz").read_bytes() == feats
    cuts = CutSet.from_file(out).to_eager()
    for index, piece in enumerate(cuts.split(2)):
        if index == 1:
            piece.to_file(manifests / f"ja_cuts_dev.{index:08d}.jsonl.gz")
    fbank_bin.main(["--source-dir", str(manifests), "--dest-dir", str(tmp_path / "fbank"),
                    "--prefix", "ja", "--subset", "dev", "--split-cuts", "1",
                    "--split-begin", "0", "--split-end", "2", "--num-jobs", "1"])  # fmt: skip
    piece = tmp_path / "fbank" / "ja_cuts_dev.00000001.jsonl.gz"
    assert len(CutSet.from_file(piece)) == len(cuts.split(2)[1])
    assert not (tmp_path / "fbank" / "ja_cuts_dev.00000000.jsonl.gz").exists()
    assert all(c.has_features for c in CutSet.from_file(piece))


def test_upstream_infer_helpers_take_upstream_arguments(tmp_path):
    import numpy as np
    import soundfile as sf

    from zipvoice.utils import infer

    sr = 24000
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr)
    path = tmp_path / "p.wav"
    sf.write(path, np.concatenate([np.zeros(sr // 2), tone, np.zeros(sr // 2)]), 16000)
    wav = infer.load_prompt_wav(str(path), sampling_rate=sr)
    assert wav.shape == (1, 2 * sr * 3 // 2) and wav.dtype == torch.float32
    quiet, rms = infer.rms_norm(wav * 0.1, target_rms=0.1)
    assert torch.sqrt(torch.mean(quiet**2)) == pytest.approx(0.1, rel=1e-4) and rms < 0.1
    trimmed = infer.remove_silence(wav, sr, only_edge=False, trail_sil=200)
    assert trimmed.shape[0] == 1 and trimmed.shape[1] < wav.shape[1]
    assert trimmed[0, -int(0.19 * sr) :].abs().max() == 0  # the 200 ms trailing silence
    a, b = torch.ones(1, 4800), torch.zeros(1, 4800)
    joined = infer.cross_fade_concat([a, b], fade_duration=0.1, sample_rate=sr)
    assert joined.shape == (1, 4800 + 4800 - 2400)
    chunks = infer.chunk_tokens_punctuation(list("ab,cd.ef"), max_tokens=3)
    assert ["".join(c) for c in chunks] == ["ab,", "cd.", "ef"]
    batches, index = infer.batchify_tokens([[1, 2, 3], [1]], max_duration=10, prompt_duration=1,
                                           token_duration=1)  # fmt: skip
    assert batches == [[[1], [1, 2, 3]]] and index == [1, 0]
    assert infer.add_punctuation("hello") == "hello."


def test_upstream_dataset_keywords_and_datamodule_names(japanese_fbank_manifests):
    from zipvoice.dataset.config import DataConfig
    from zipvoice.dataset.datamodule import TtsDataModule
    from zipvoice.dataset.dataset import SpeechSynthesisDataset

    data = japanese_fbank_manifests
    module = TtsDataModule(DataConfig(dataset="custom", num_workers=0, max_duration=20))
    cuts = module.train_custom_cuts(str(data["train_cuts"]))
    assert len(module.dev_custom_cuts(str(data["dev_cuts"]))) > 0
    batch = SpeechSynthesisDataset(return_text=False, return_tokens=True, return_spk_ids=True)[
        cuts.subset(first=2)
    ]
    assert "text" not in batch and len(batch["tokens"]) == 2
    assert batch["speakers"] == [c.supervisions[0].speaker for c in cuts.subset(first=2)]


# ---------------------------------------------------------------- distillation


def test_distillation_from_a_lora_teacher_lowers_the_distillation_loss(
    japanese_fbank_manifests, tmp_path
):
    import random

    from tests.helpers import make_model_dir
    from zipvoice.bin.train_zipvoice_distill import main as distill_main
    from zipvoice.training.distill import distillation_loss
    from zipvoice.training.distill_run import DistillRun
    from zipvoice.training.steps import prepare_batch

    data = japanese_fbank_manifests
    run_training(user_config(data, tmp_path / "lora", num_iters=4, save_every_n=0,
                             valid_interval=0, use_dora=False))  # fmt: skip
    base = make_model_dir(tmp_path / "base", "zipvoice")
    argv = user_flags(data, tmp_path / "distill", num_iters=2, save_every_n=1)
    keep = {"--max-duration", "--tokenizer", "--dataset", "--train-manifest", "--dev-manifest",
            "--num-workers", "--exp-dir", "--num-iters", "--save-every-n"}  # fmt: skip
    argv = [v for k, v in zip(argv[::2], argv[1::2], strict=True) for v in (k, v) if k in keep]
    argv += ["--teacher-model", str(base / "model.pt"), "--teacher-lora",
             str(tmp_path / "lora" / "adapter"), "--distill-stage", "first"]  # fmt: skip
    assert distill_main(argv + ["--base-lr", "0.01"]) == 0
    out = tmp_path / "distill"
    assert (out / "distilled" / "model.pt").is_file() and (out / "checkpoint-2.pt").is_file()
    average_main(["--iter", "2", "--avg", "2", "--use-averaged-model", "0", "--exp-dir", str(out),
                  "--model-name", "zipvoice_distill"])  # fmt: skip
    assert (out / "iter-2-avg-2.pt").is_file()

    from zipvoice.bin.train_zipvoice_distill import config_from_args, get_parser

    config = config_from_args(get_parser().parse_args(argv + ["--exp-dir", str(tmp_path / "d2"),
                                                             "--base-lr", "0.02"]))  # fmt: skip
    run = DistillRun(config)
    raw = next(iter(run.loader()))
    batch = prepare_batch(raw, run.tokenizer, config.feat_scale, torch.device("cpu"))

    def fixed_loss() -> float:
        run.student.eval()
        torch.manual_seed(0)
        rng = random.Random(0)
        with torch.no_grad():
            value = sum(float(distillation_loss(run.student, run.teacher, batch, "first", rng))
                        for _ in range(6)) / 6  # fmt: skip
        run.student.train()
        return value

    before = fixed_loss()
    for _ in range(20):
        run.train_step(raw)
    after = fixed_loss()
    print(f"\ndistillation loss on a fixed batch: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


# ---------------------------------------------------------------- diagnostic flags


def test_inf_check_names_the_first_module_with_a_non_finite_output(caplog):
    import logging

    from zipvoice.utils.hooks import register_inf_check_hooks

    class Blowup(torch.nn.Module):
        def forward(self, x):
            return x / 0.0

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Blowup(), torch.nn.Linear(2, 2))
    register_inf_check_hooks(model)
    with caplog.at_level(logging.WARNING, logger="zipvoice.train"):
        model(torch.ones(1, 2)).sum().backward()
    warned = [r.getMessage() for r in caplog.records]
    assert warned[0] == "inf-check: 1 produced a non-finite output"
    assert not any("inf-check: 0 " in w for w in warned)  # the Linear before it is fine
    assert any("gradient of 0.weight is not finite" in w for w in warned)


def test_diagnostic_flags_in_a_training_run(japanese_fbank_manifests, tmp_path, caplog):
    """--scan-oom runs the pessimistic batches first; --print-diagnostics prints per-module
    statistics after 6 batches and stops without a final save; --inf-check stays quiet on a
    healthy run."""
    import logging

    config = user_config(japanese_fbank_manifests, tmp_path, num_iters=10, save_every_n=0,
                         valid_interval=0, max_duration=3, print_diagnostics=True,
                         scan_oom=True, inf_check=True)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="zipvoice.train"):
        run_training(config)
    text = caplog.text
    assert "scan-oom: batch with the largest" in text and "fits" in text
    assert "diagnostics over 6 batches" in text and "grad_rms" in text
    assert "fm_decoder" in text.split("diagnostics over 6 batches", 1)[1]
    assert "inf-check" not in text
    assert not (tmp_path / "adapter").exists()


def test_full_fine_tuning_ends_with_the_averaged_model(japanese_fbank_manifests, tmp_path):
    config = user_config(
        japanese_fbank_manifests, tmp_path, use_lora=False, optimizer="scaledadam",
        base_lr=0.02, num_iters=3, save_every_n=1, valid_interval=0, average_period=1, avg=2,
        keep_last_k=5, use_fp16=False,
    )  # fmt: skip
    run_training(config)
    step2 = torch.load(tmp_path / "checkpoint-2.pt", weights_only=True)["model"]
    step3 = torch.load(tmp_path / "checkpoint-3.pt", weights_only=True)["model"]
    final = torch.load(tmp_path / "finetuned" / "model.pt", weights_only=True)["model"]
    moved = [k for k in step3 if not torch.equal(step2[k], step3[k])]
    assert moved
    for key in moved:
        assert torch.allclose(final[key], (step2[key] + step3[key]) / 2, atol=1e-6), key


def test_upstream_checkpoints_with_paths_load_and_average_but_code_is_refused(tmp_path):
    import os as os_module

    weights = upstream_run(tmp_path / "exp")
    for step in (10, 20, 30):  # upstream stores exp_dir as a PosixPath
        path = tmp_path / "exp" / f"checkpoint-{step}.pt"
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["exp_dir"] = Path("exp/zipvoice")
        torch.save(checkpoint, path)
    rest = upstream_ckpt.load_checkpoint(tmp_path / "exp" / "checkpoint-30.pt", tiny_model())
    assert rest["exp_dir"] == Path("exp/zipvoice")
    average_main(["--iter", "30", "--avg", "2", "--exp-dir", str(tmp_path / "exp")])
    averaged = torch.load(tmp_path / "exp" / "iter-30-avg-2.pt", weights_only=True)["model"]
    for key, value in mean_of(weights[1:]).items():
        assert torch.allclose(averaged[key].double(), value, atol=1e-5), key

    class RunsCode:
        def __reduce__(self):
            return (os_module.system, ("true",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": RunsCode()}, evil)
    with pytest.raises(upstream_ckpt.CheckpointError, match="refused"):
        upstream_ckpt.load_checkpoint(evil)
