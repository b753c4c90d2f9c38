"""`--compile` (torch.compile of the decoder, inductor on the CPU) computes what eager does.

Compilation is slow on a small CPU (inductor generates and builds C++ kernels: about 25 s for
this one-layer decoder on 2 cores with an empty cache), so the model is the smallest that
still has every block of a decoder layer: one stack of one Zipformer layer, 64 channels.
"""

from __future__ import annotations

import pytest
import torch

from zipvoice.inference.torch_backend import compile_decoder
from zipvoice.models.zipvoice import ZipVoice

pytestmark = pytest.mark.slow


def _tiny_model() -> ZipVoice:
    torch.manual_seed(0)
    model = ZipVoice(
        fm_decoder_downsampling_factor=(1,),
        fm_decoder_num_layers=(1,),
        fm_decoder_cnn_module_kernel=(7,),
        fm_decoder_feedforward_dim=96,
        fm_decoder_num_heads=4,
        fm_decoder_dim=64,
        text_encoder_num_layers=1,
        text_encoder_feedforward_dim=64,
        text_encoder_cnn_module_kernel=5,
        text_encoder_num_heads=4,
        text_encoder_dim=32,
        query_head_dim=8,
        value_head_dim=4,
        pos_head_dim=4,
        pos_dim=16,
        time_embed_dim=32,
        text_embed_dim=32,
        feat_dim=100,
        vocab_size=20,
    ).eval()
    with torch.no_grad():  # random weights large enough that every block shapes the output
        for p in model.fm_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_compiled_decoder_matches_eager_within_1e_4(monkeypatch, tmp_path):
    # A private kernel cache: kernels built by an earlier run are not reused.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from torch._dynamo.utils import counters

    counters.clear()
    model = _tiny_model()
    generator = torch.Generator().manual_seed(1)
    x, text, speech = (torch.randn(2, 37, 100, generator=generator) for _ in range(3))
    padding = torch.arange(37)[None, :] >= torch.tensor([37, 29])[:, None]
    t = torch.tensor(0.3)
    with torch.inference_mode():
        eager = model.forward_fm_decoder(t, x, text, speech, padding)
        assert float(eager.abs().mean()) > 0.05  # the output is not trivially small
        compile_decoder(model)
        compiled = model.forward_fm_decoder(t, x, text, speech, padding)
    # The call went through dynamo and inductor: graphs were captured and kernels compiled.
    assert counters["stats"]["unique_graphs"] > 0
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"] >= 1
    assert not counters["graph_break"]  # one graph for the whole decoder
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert set(model.state_dict()) == set(_tiny_model().state_dict())  # keys unchanged


def test_compile_refuses_a_time_gated_model():
    model = _tiny_model()
    model.time_gate = object()
    with pytest.raises(ValueError, match="--lora-t-range"):
        compile_decoder(model)
