"""Predicted quality on real synthesised speech: DNSMOS must rate clean speech above the same
speech buried in noise; UTMOS loads upstream's checkpoint layout (a tiny random model of the
real architecture) or an ONNX export, and explains what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("speechmos", reason="DNSMOS needs the eval extra")

from tests.eval_audio import add_noise, make_voices, write_test_list  # noqa: E402
from tests.ssl_layout import to_original_name  # noqa: E402
from zipvoice.eval.mos.dnsmos import DNSMOS  # noqa: E402
from zipvoice.eval.mos.utmos import ONNX_MODEL, UPSTREAM_CHECKPOINT, UTMOS  # noqa: E402
from zipvoice.eval.utils import EvalError, load_wav, read_test_list  # noqa: E402

VOICES = ("flite_slt", "ojt_mei")  # English and Japanese; DNSMOS takes ~1-3 s a clip


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[str, list[Path]]:
    return make_voices(tmp_path_factory.mktemp("voices"), VOICES)


def nine_seconds(paths: list[Path]) -> np.ndarray:
    """Both sentences of a voice, repeated to 9.1 s: DNSMOS scores 9.01 s windows at 1 s hops
    and loops shorter clips by doubling, so this length costs one window (~1 s of CPU)."""
    wave = np.concatenate([load_wav(p, 16000) for p in paths])
    return np.resize(wave, int(9.1 * 16000)).astype(np.float32)


@pytest.fixture(scope="module")
def dnsmos() -> DNSMOS:
    return DNSMOS()


def test_dnsmos_clean_speech_beats_the_same_speech_in_heavy_noise(voices, dnsmos):
    for voice, paths in voices.items():
        clean = nine_seconds(paths)
        noisy = add_noise(clean, snr_db=0.0, seed=1)
        a, b = dnsmos.scores(clean), dnsmos.scores(noisy)
        # Overall and background quality both drop; every number stays on the 1-5 scale.
        assert a["ovrl"] > b["ovrl"] + 0.5, (voice, a, b)
        assert a["bak"] > b["bak"] + 1.0, (voice, a, b)
        assert all(1.0 <= v <= 5.0 for v in [*a.values(), *b.values()]), (voice, a, b)


def test_dnsmos_scorer_reads_the_generated_wav(voices, dnsmos, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    clean = nine_seconds(voices["flite_slt"])
    sf.write(gen / "noisy.wav", add_noise(clean, 0.0), 16000)
    sf.write(gen / "clean.wav", clean, 16000)
    prompt = voices["flite_slt"][0]
    rows = [(n, "x", prompt, "y") for n in ("clean", "noisy")]
    items = read_test_list(write_test_list(tmp_path / "list.tsv", rows))
    clean_item, noisy_item = items
    assert dnsmos.score(clean_item, gen) > dnsmos.score(noisy_item, gen)
    with pytest.raises(EvalError, match="unknown DNSMOS field"):
        DNSMOS(field="loudness")


class _LevelModel(torch.nn.Module):
    """A stand-in MOS model with the export's interface: (1, samples) -> score, here
    1 + 4 * min(1, 10 * rms), so that a louder clip gets a higher score."""

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        rms = wave.square().mean().sqrt()
        return 1.0 + 4.0 * torch.clamp(10.0 * rms, max=1.0)


def test_utmos_runs_an_onnx_model_from_model_dir(tmp_path):
    path = tmp_path / ONNX_MODEL
    path.parent.mkdir(parents=True)
    torch.onnx.export(
        _LevelModel(),
        (torch.zeros(1, 16000),),
        str(path),
        input_names=["wave"],
        output_names=["score"],
        dynamic_axes={"wave": {1: "samples"}},
        dynamo=False,
    )
    utmos = UTMOS(model_dir=str(tmp_path))
    t = np.arange(16000) / 16000
    quiet = (0.01 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    loud = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    assert utmos.score_wav(quiet) == pytest.approx(1 + 4 * 10 * 0.01 / np.sqrt(2), rel=1e-3)
    assert utmos.score_wav(loud) == pytest.approx(5.0)


def tiny_utmos():
    from transformers import Wav2Vec2Config

    from zipvoice.eval.models.utmos import UTMOS22Strong

    config = Wav2Vec2Config(
        hidden_size=64,  # one 64-wide attention head, as the loader infers from the width
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=32,
        conv_dim=[8] * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    model = UTMOS22Strong(config, domain_dim=4, judge_dim=4, rnn_hidden=8, proj_hidden=16)
    with torch.no_grad():
        model.domain_emb.normal_()
        model.judge_emb.normal_()
    return model.eval()


def save_upstream_utmos(model, path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("wav2vec2."):
            key = "wav2vec2." + to_original_name(key[len("wav2vec2.") :], group_norm=True)
        state[key] = tensor.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_utmos_runs_upstreams_checkpoint_layout(voices, tmp_path):
    model = tiny_utmos()
    state = save_upstream_utmos(model, tmp_path / UPSTREAM_CHECKPOINT)
    for name in (  # names in upstream's utmos22_strong_step7459_v1.pt
        "wav2vec2.feature_extractor.conv_layers.0.2.weight",
        "wav2vec2.encoder.pos_conv.0.weight_g",
        "wav2vec2.encoder.layers.1.self_attn_layer_norm.bias",
        "wav2vec2.post_extract_proj.weight",
        "blstm.weight_ih_l0_reverse",
        "projection.2.bias",
        "domain_emb",
        "judge_emb",
    ):
        assert name in state, name
    utmos = UTMOS(model_dir=str(tmp_path))
    wav = load_wav(voices["ojt_mei"][0], 16000)
    with torch.no_grad():
        expected = float(model(torch.from_numpy(wav)[None])[0])
    assert utmos.score_wav(wav) == pytest.approx(expected, abs=1e-5)
    del state["blstm.bias_hh_l0"]
    torch.save(state, tmp_path / UPSTREAM_CHECKPOINT)
    with pytest.raises(EvalError, match="blstm.bias_hh_l0"):
        UTMOS(model_dir=str(tmp_path))


def test_utmos_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(EvalError, match="needs its weights"):
        UTMOS()
    with pytest.raises(EvalError, match="not found"):
        UTMOS(model_dir=str(tmp_path))
    (tmp_path / UPSTREAM_CHECKPOINT).parent.mkdir(parents=True)
    (tmp_path / UPSTREAM_CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(EvalError, match="weights only"):
        UTMOS(model_dir=str(tmp_path))
