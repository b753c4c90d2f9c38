"""The training evaluation hook (zipvoice.training.eval_hook): an eval list synthesised with the
current weights at each validation, scored with the offline metrics, written beside the
checkpoints and logged to TensorBoard, on the tiny reference-format model and the generated
Japanese corpus of tests/test_train.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.data_fixtures import *  # noqa: F403 - session fixtures
from tests.helpers import free_port
from tests.test_train import MODEL_DIR, user_config, user_flags
from zipvoice.bin.train_zipvoice import get_parser
from zipvoice.dataset.synthetic import PseudoSpeaker, synthesize
from zipvoice.eval.utils import EvalError
from zipvoice.inference.common import SAMPLING_RATE
from zipvoice.training.callbacks import RecordLosses
from zipvoice.training.config import TrainingConfig
from zipvoice.training.eval_hook import (
    SCORES_FILE,
    SUMMARY_FILE,
    EvalHook,
    load_eval_vocoder,
    step_dir,
)
from zipvoice.training.trainer import run_training

# A voice the training corpus does not have (its pseudo-speakers are the first two of
# zipvoice.dataset.synthetic.PSEUDO_SPEAKERS), and a probe sentence of the accent probe.
UNSEEN = PseudoSpeaker(speed=1.0, half_tone=7.0)
PROMPT_TEXT = "今日はいい天気ですね。"
LINES = {"seen_probe": "これは箸です。", "unseen": "明日は晴れるでしょう。"}


@pytest.fixture(scope="module")
def eval_files(japanese_corpus, tmp_path_factory) -> dict[str, Path]:
    """An eval list (a training speaker's prompt on a probe sentence, an unseen speaker's on
    another text) and a folder of ground-truth recordings of the eval texts."""
    root = tmp_path_factory.mktemp("eval_list")
    train_rows = Path(japanese_corpus["train_tsv"]).read_text(encoding="utf-8").splitlines()
    _, seen_text, seen_wav = train_rows[0].split("\t")[:3]
    unseen_wav = root / "unseen_prompt.wav"
    sf.write(unseen_wav, synthesize(PROMPT_TEXT, UNSEEN), SAMPLING_RATE)
    prompts = {"seen_probe": (seen_text, seen_wav), "unseen": (PROMPT_TEXT, unseen_wav)}
    rows = [f"{n}\t{prompts[n][0]}\t{prompts[n][1]}\t{text}" for n, text in LINES.items()]
    (root / "eval.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ref_dir = root / "ref"
    ref_dir.mkdir()
    for name, text in LINES.items():
        sf.write(ref_dir / f"{name}.wav", synthesize(text, UNSEEN), SAMPLING_RATE)
    return {"list": root / "eval.tsv", "ref_dir": ref_dir}


def test_eval_flags_fill_the_eval_config(japanese_fbank_manifests, eval_files, tmp_path):
    argv = user_flags(japanese_fbank_manifests, tmp_path, eval_list=eval_files["list"],
                      eval_num_step=4, eval_ref_dir=eval_files["ref_dir"])  # fmt: skip
    config = TrainingConfig.from_flags(get_parser().parse_args(argv))
    assert config.eval.eval_list == str(eval_files["list"]) and config.eval.eval_num_step == 4
    assert config.eval.eval_vocoder == "griffin-lim" and config.eval.eval_metrics == "auto"
    assert config.flags()["eval_ref_dir"] == str(eval_files["ref_dir"])
    defaults = TrainingConfig.from_flags(get_parser().parse_args([]))
    assert defaults.eval.eval_list is None and defaults.eval.eval_num_step == 16


def test_bad_eval_settings_fail_before_training(japanese_fbank_manifests, eval_files, tmp_path):
    data = japanese_fbank_manifests
    broken = tmp_path / "broken.tsv"
    broken.write_text("a\tprompt text\tmissing.wav\ttext\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        user_config(data, tmp_path / "x", eval_list=str(broken)).validate()
    with pytest.raises(ValueError, match="--eval-num-step"):
        user_config(data, tmp_path / "x", eval_list=str(eval_files["list"]),
                    eval_num_step=0).validate()  # fmt: skip
    with pytest.raises(ValueError, match="f0_corr needs --eval-ref-dir"):
        user_config(data, tmp_path / "x", eval_list=str(eval_files["list"]),
                    eval_metrics="sim,f0_corr").validate()  # fmt: skip
    with pytest.raises(ValueError, match="cer needs downloaded models"):
        user_config(data, tmp_path / "x", eval_list=str(eval_files["list"]),
                    eval_metrics="cer").validate()  # fmt: skip


def test_auto_metrics_follow_the_list_and_the_reference_folder(eval_files, tmp_path):
    from zipvoice.eval.utils import read_test_list
    from zipvoice.training.config import EvalConfig
    from zipvoice.training.eval_hook import choose_metrics

    items = read_test_list(eval_files["list"])
    plain = choose_metrics(EvalConfig(eval_list=str(eval_files["list"])), items)
    assert plain == {"sim": list(LINES), "dnsmos": list(LINES), "accent_probe": ["seen_probe"]}
    (tmp_path / "unseen.wav").write_bytes((eval_files["ref_dir"] / "unseen.wav").read_bytes())
    config = EvalConfig(eval_list=str(eval_files["list"]), eval_ref_dir=str(tmp_path))
    with_ref = choose_metrics(config, items)
    assert with_ref["f0_corr"] == with_ref["vuv_error"] == ["unseen"]  # the one with a reference
    picked = choose_metrics(EvalConfig(eval_list="x", eval_metrics="dnsmos,accent_probe"), items)
    assert picked == {"dnsmos": list(LINES), "accent_probe": ["seen_probe"]}


def test_vocoder_names(tmp_path, monkeypatch):
    from zipvoice.models.griffin_lim import GriffinLimVocoder

    assert isinstance(load_eval_vocoder("griffin-lim"), GriffinLimVocoder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_eval_vocoder(str(tmp_path / "no" / "such" / "vocos"))
    # A hub repo id takes the real download path; offline it fails in one line.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EvalError, match="hub failed"):
        load_eval_vocoder("charactr/vocos-mel-24khz")


@pytest.fixture(scope="module")
def module_env():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def eval_run(
    japanese_fbank_manifests, eval_files, tmp_path_factory, module_env
) -> tuple[Path, RecordLosses]:
    """4 steps validating every 2 (steps 0, 2, 4), tensorboard and wandb (offline) on, the eval
    list scored with every offline metric that applies."""
    exp_dir = tmp_path_factory.mktemp("eval_run") / "exp"
    module_env.delenv("WANDB_API_KEY", raising=False)
    module_env.setenv("WANDB_MODE", "offline")
    module_env.setenv("NETRC", str(exp_dir.parent / "no-netrc"))
    record = RecordLosses()
    config = user_config(
        japanese_fbank_manifests,
        exp_dir,
        tensorboard=True,
        wandb_project="zipvoice-eval-hook",
        save_every_n=0,
        eval_list=str(eval_files["list"]),
        eval_num_step=4,
        eval_ref_dir=str(eval_files["ref_dir"]),
    )
    run_training(config, callbacks=[record])
    return exp_dir, record


METRICS = ("sim", "dnsmos", "accent_probe", "f0_corr", "f0_rmse", "vuv_error")


def test_each_validation_writes_the_wavs_and_scores(eval_run):
    exp_dir, record = eval_run
    assert sorted(p.name for p in (exp_dir / "eval").iterdir()) == ["step-0", "step-2", "step-4"]
    for step in (0, 2, 4):
        folder = step_dir(exp_dir, step)
        for name in LINES:
            wave, sr = sf.read(folder / f"{name}.wav")
            assert sr == SAMPLING_RATE and wave.size > SAMPLING_RATE // 10
        rows = [r.split("\t") for r in (folder / SCORES_FILE).read_text().splitlines()]
        assert rows[0] == ["name", *METRICS]
        table = {row[0]: dict(zip(METRICS, row[1:], strict=True)) for row in rows[1:]}
        assert set(table) == set(LINES)
        assert table["unseen"]["accent_probe"] == ""  # not a probe sentence
        assert table["seen_probe"]["accent_probe"] in ("0.000000", "1.000000")
        for name in LINES:
            assert -1.0 <= float(table[name]["sim"]) <= 1.0
            assert 1.0 <= float(table[name]["dnsmos"]) <= 5.0
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        assert summary["step"] == step and summary["settings"]["eval_num_step"] == 4
        assert summary["metrics"]["sim"]["n"] == 2 and summary["metrics"]["accent_probe"]["n"] == 1
        sims = [float(table[n]["sim"]) for n in LINES]
        assert summary["metrics"]["sim"]["mean"] == pytest.approx(np.mean(sims), abs=1e-6)
    # The same scores reach the callbacks as eval/<metric>, at every validation.
    assert [step for step, _ in record.valid] == [0, 2, 4]
    for step, values in record.valid:
        summary = json.loads((step_dir(exp_dir, step) / SUMMARY_FILE).read_text())
        for metric in ("sim", "dnsmos"):
            assert values[f"eval/{metric}"] == pytest.approx(summary["metrics"][metric]["mean"])


def test_tensorboard_holds_the_eval_audio_and_scalars(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_dir, record = eval_run
    events = EventAccumulator(str(exp_dir / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    tags = events.Tags()
    for name in LINES:
        clips = events.Audio(f"eval/audio/{name}")
        assert [c.step for c in clips] == [0, 2, 4]
        assert all(c.sample_rate == SAMPLING_RATE and c.length_frames > 0 for c in clips)
    for metric in ("sim", "dnsmos", "accent_probe"):
        assert f"eval/{metric}" in tags["scalars"]
        logged = {e.step: e.value for e in events.Scalars(f"eval/{metric}")}
        assert sorted(logged) == [0, 2, 4]
        expected = {step: values[f"eval/{metric}"] for step, values in record.valid}
        assert logged == pytest.approx(expected, abs=1e-5)


def test_wandb_gets_the_eval_audio(eval_run):
    exp_dir, _ = eval_run
    run_dirs = list((exp_dir / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    clips = list((run_dirs[0] / "files" / "media" / "audio").rglob("*.wav"))
    assert len(clips) == 3 * len(LINES)  # each line at steps 0, 2, 4
    for clip in clips:
        wave, sr = sf.read(clip)
        assert sr == SAMPLING_RATE and wave.size > 0


def test_under_ddp_rank_0_alone_evaluates(japanese_fbank_manifests, eval_files, tmp_path):
    config = user_config(
        japanese_fbank_manifests,
        tmp_path,
        world_size=2,
        master_port=free_port(),
        num_iters=2,
        save_every_n=0,
        valid_interval=0,
        max_duration=3,
        eval_list=str(eval_files["list"]),
        eval_num_step=2,
        eval_metrics="sim",
    )
    assert run_training(config) is None
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["step-2"]
    summary = json.loads((step_dir(tmp_path, 2) / SUMMARY_FILE).read_text())
    assert list(summary["metrics"]) == ["sim"] and summary["metrics"]["sim"]["n"] == 2
    logs = {p.name: p.read_text() for p in (tmp_path / "log").iterdir()}
    assert sum("eval at step 2" in text for text in logs.values()) == 1


def test_evaluation_leaves_training_unchanged(eval_run, japanese_fbank_manifests, tmp_path):
    """Same losses with and without the eval list: the hook restores the RNG streams and
    the model's train mode."""
    _, with_eval = eval_run
    without = RecordLosses()
    run_training(
        user_config(japanese_fbank_manifests, tmp_path, save_every_n=0), callbacks=[without]
    )
    assert [loss for _, loss in without.train] == [loss for _, loss in with_eval.train]
    for (_, a), (_, b) in zip(without.valid, with_eval.valid, strict=True):
        assert a["valid/loss"] == b["valid/loss"]


@pytest.fixture()
def hook_and_model(japanese_fbank_manifests, eval_files, tmp_path):
    """An EvalHook and the tiny model with fresh adapters, without a training run."""
    from zipvoice.tokenizer.tokenizer import get_tokenizer
    from zipvoice.training.eval_hook import make_eval_hook
    from zipvoice.training.model_setup import setup_model

    config = user_config(japanese_fbank_manifests, tmp_path, eval_list=str(eval_files["list"]),
                         eval_num_step=2, eval_ref_dir=str(eval_files["ref_dir"]))  # fmt: skip
    tokenizer = get_tokenizer("japanese", config.model.token_file)
    model_json = json.loads((MODEL_DIR / "model.json").read_text())
    model = setup_model(config, tokenizer.vocab_size, tokenizer.pad_id, model_json).model
    hook = make_eval_hook(config, tmp_path, 0, tokenizer, torch.device("cpu"), None)
    assert make_eval_hook(config, tmp_path, 1, tokenizer, torch.device("cpu"), None) is None
    return hook, model


def test_silent_output_gives_nan_and_a_warning_not_a_crash(hook_and_model, monkeypatch, caplog):
    from zipvoice.models.griffin_lim import GriffinLimVocoder

    hook, model = hook_and_model
    assert isinstance(hook, EvalHook)

    def silence(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mel.shape[0], mel.shape[-1] * 256)

    monkeypatch.setattr(GriffinLimVocoder, "decode", silence)
    with caplog.at_level(logging.WARNING, logger="zipvoice.train"):
        means = hook.run(model, step=7)
    # Voiced frames are what the F0 match compares: silence has none (an EvalError).
    for metric in ("f0_corr", "f0_rmse", "vuv_error"):
        assert math.isnan(means[metric])
        assert f"{metric} of 'unseen' is NaN" in caplog.text
    summary = json.loads((step_dir(hook.exp_dir, 7) / SUMMARY_FILE).read_text())
    assert summary["metrics"]["f0_corr"] == {
        "mean": None, "ci95": None, "n": 0, "failed": 2, "higher_is_better": True
    }  # fmt: skip
    assert "f0_corr could score no line" in caplog.text
    assert "nan" in (step_dir(hook.exp_dir, 7) / SCORES_FILE).read_text()
    assert model.training  # restored


def test_a_failed_synthesis_is_nan_and_the_folder_is_replaced(hook_and_model, monkeypatch, caplog):
    import zipvoice.inference.generation as generation

    hook, model = hook_and_model
    hook.run(model, step=3)
    first = sf.read(step_dir(hook.exp_dir, 3) / "unseen.wav")[0]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generation, "generate_wave", broken)
    with caplog.at_level(logging.WARNING, logger="zipvoice.train"):
        means = hook.run(model, step=3)  # again at step 3, as after a resume
    assert all(math.isnan(v) for v in means.values())
    assert "synthesising 'unseen' failed" in caplog.text and "out of memory" in caplog.text
    folder = step_dir(hook.exp_dir, 3)
    assert not list(folder.glob("*.wav"))  # the earlier attempt's folder was replaced whole
    assert first.size > 0 and (folder / SUMMARY_FILE).is_file()
