"""Speaker similarity on real synthesised speech: one voice saying two sentences must score
higher than any two different voices; and upstream's WavLM + ECAPA-TDNN checkpoint layout
loads (as weights only) into the model written here, tested with a tiny random model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("resemblyzer", reason="speaker similarity needs the eval extra")

from tests.eval_audio import make_voices  # noqa: E402
from tests.ssl_layout import to_original_name  # noqa: E402
from zipvoice.eval.speaker_similarity.sim import SV_CHECKPOINT, SpeakerSimilarity  # noqa: E402
from zipvoice.eval.utils import EvalError, load_wav  # noqa: E402


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[str, list[Path]]:
    return make_voices(tmp_path_factory.mktemp("voices"))


@pytest.fixture(scope="module")
def scorer() -> SpeakerSimilarity:
    return SpeakerSimilarity()


def test_same_voice_scores_above_every_other_voice(voices, scorer):
    same = {v: scorer.similarity(a, b) for v, (a, b) in voices.items()}
    failures = []
    for v, w in itertools.combinations(voices, 2):
        # Both directions: v's sentence a against w's sentence b and vice versa.
        for x, y in ((v, w), (w, v)):
            cross = scorer.similarity(voices[x][0], voices[y][1])
            if not cross < min(same[x], same[y]):
                failures.append((x, y, round(cross, 3), round(same[x], 3), round(same[y], 3)))
    assert not failures, f"cross-voice similarity not below same-voice: {failures}"
    # An utterance against itself is (numerically) identical.
    a = voices["flite_slt"][0]
    assert scorer.similarity(a, a) == pytest.approx(1.0, abs=1e-5)


# ---- upstream's SIM-o model: WavLM (transformers) + ECAPA-TDNN head, tiny and random ----


def tiny_model():
    from transformers import WavLMConfig

    from zipvoice.eval.models.ecapa_tdnn_wavlm import EcapaTdnnWavLM

    config = WavLMConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=[8] * 7,
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    model = EcapaTdnnWavLM(config, channels=16, emb_dim=8, pool_channels=24, se_bottleneck=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics and layer mix
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        model.feature_weight.normal_()
    return model.eval()


def save_upstream_layout(model, path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("wavlm."):
            key = "feature_extract.model." + to_original_name(key[len("wavlm.") :])
        state[key] = tensor.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return state


def test_wavlm_ecapa_checkpoint_layout_loads_and_embeds_like_the_model(voices, tmp_path):
    model = tiny_model()
    state = save_upstream_layout(model, tmp_path / SV_CHECKPOINT)
    for name in (  # names of the published checkpoint
        "feature_extract.model.encoder.layers.0.self_attn.grep_a",
        "feature_extract.model.encoder.layers.0.self_attn.relative_attention_bias.weight",
        "feature_extract.model.encoder.pos_conv.0.weight_g",
        "feature_extract.model.feature_extractor.conv_layers.0.2.1.weight",
        "feature_extract.model.encoder.layers.1.self_attn_layer_norm.weight",
        "feature_extract.model.post_extract_proj.weight",
        "layer2.Res2Conv1dReluBn.convs.0.weight",
        "layer4.SE_Connect.linear2.bias",
        "pooling.linear1.weight",
        "feature_weight",
    ):
        assert name in state, name
    sim = SpeakerSimilarity(model_dir=str(tmp_path))
    wav = load_wav(voices["flite_awb"][0], 16000)[:16000]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(torch.from_numpy(wav)[None])[0], dim=0)
    np.testing.assert_allclose(sim.encoder.embed(wav), expected.numpy(), atol=1e-5)
    score = sim.similarity(voices["flite_awb"][0], voices["flite_slt"][0])
    assert -1.0 <= score <= 1.0


def test_wavlm_ecapa_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(EvalError, match="TTS_eval_models"):
        SpeakerSimilarity(model_dir=str(tmp_path))
    model = tiny_model()
    state = save_upstream_layout(model, tmp_path / SV_CHECKPOINT)
    del state["layer3.SE_Connect.linear1.weight"]
    torch.save({"model": state}, tmp_path / SV_CHECKPOINT)
    with pytest.raises(EvalError, match="layer3.SE_Connect.linear1.weight"):
        SpeakerSimilarity(model_dir=str(tmp_path))
    # A pickled module (code, not weights) is refused rather than executed.
    torch.save({"model": model.pooling}, tmp_path / SV_CHECKPOINT)
    with pytest.raises(EvalError, match="weights only"):
        SpeakerSimilarity(model_dir=str(tmp_path))


def test_wavlm_from_the_pretrained_file_when_the_checkpoint_holds_only_the_head(voices, tmp_path):
    from zipvoice.eval.speaker_similarity.sim import SSL_CHECKPOINT

    model = tiny_model()
    state = save_upstream_layout(model, tmp_path / SV_CHECKPOINT)
    prefix = "feature_extract.model."
    head = {k: t for k, t in state.items() if not k.startswith(prefix)}
    wavlm = {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}
    torch.save({"model": head}, tmp_path / SV_CHECKPOINT)
    (tmp_path / SSL_CHECKPOINT).parent.mkdir(parents=True)
    torch.save({"cfg": {"encoder_layers": 2}, "model": wavlm}, tmp_path / SSL_CHECKPOINT)
    wav = load_wav(voices["flite_rms"][0], 16000)[:16000]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(torch.from_numpy(wav)[None])[0], dim=0)
    sim = SpeakerSimilarity(model_dir=str(tmp_path))
    np.testing.assert_allclose(sim.encoder.embed(wav), expected.numpy(), atol=1e-5)
