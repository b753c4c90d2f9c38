"""UTMOS22 "strong" learner (Saeki et al. 2022), the MOS predictor upstream ZipVoice reports,
without its phoneme encoder, as in upstream's inference model: wav2vec 2.0 base features,
concatenated with a learnt data-domain and judge embedding, a BLSTM, a two-layer projection to
one score per frame, the time average mapped from [-1, 1] onto the 1-5 scale (x 2 + 3).

Written here against the parameter names of upstream's checkpoint
`mos/utmos22_strong_step7459_v1.pt` (`wav2vec2.*` in the original fairseq naming,
`domain_emb`, `judge_emb`, `blstm.*`, `projection.{0,2}.*`); wav2vec 2.0 itself is
`transformers`' `Wav2Vec2Model`, its keys renamed by `fairseq_key_to_hf` and its sizes read
from the checkpoint's shapes."""

from __future__ import annotations

import torch
from torch import nn

from zipvoice.eval.models.ecapa_tdnn_wavlm import load_complete, ssl_config_kwargs

SSL_PREFIX = "wav2vec2."
HEAD_DIM = 64  # wav2vec 2.0's attention head size (base: 768 = 12 x 64)


class UTMOS22Strong(nn.Module):
    """(batch, samples) 16 kHz waveform -> (batch,) predicted MOS."""

    def __init__(
        self,
        ssl_config,
        domain_dim: int = 128,
        judge_dim: int = 128,
        rnn_hidden: int = 512,
        proj_hidden: int = 2048,
    ):
        from transformers import Wav2Vec2Model

        super().__init__()
        ssl_config.layerdrop = 0.0
        ssl_config.apply_spec_augment = False
        self.wav2vec2 = Wav2Vec2Model(ssl_config)
        self.domain_emb = nn.Parameter(torch.zeros(1, domain_dim), requires_grad=False)
        self.judge_emb = nn.Parameter(torch.zeros(1, judge_dim), requires_grad=False)
        feat = ssl_config.hidden_size + domain_dim + judge_dim
        self.blstm = nn.LSTM(feat, rnn_hidden, batch_first=True, bidirectional=True)
        self.projection = nn.Sequential(
            nn.Linear(2 * rnn_hidden, proj_hidden), nn.ReLU(), nn.Linear(proj_hidden, 1)
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        units = self.wav2vec2(wave).last_hidden_state  # (batch, frames, hidden)
        batch, frames, _ = units.shape
        domain = self.domain_emb.unsqueeze(1).expand(batch, frames, -1)
        judge = self.judge_emb.unsqueeze(1).expand(batch, frames, -1)
        frame_scores = self.projection(self.blstm(torch.cat([units, domain, judge], dim=2))[0])
        return frame_scores.mean(dim=1).squeeze(1) * 2 + 3


def build_utmos_from_state(state: dict[str, torch.Tensor]) -> UTMOS22Strong:
    """The model with every parameter taken from `state` (upstream's checkpoint layout)."""
    from transformers import Wav2Vec2Config

    ssl = {k[len(SSL_PREFIX) :]: t for k, t in state.items() if k.startswith(SSL_PREFIX)}
    if not ssl:
        raise ValueError(f"no wav2vec 2.0 weights ({SSL_PREFIX}*) in the checkpoint")
    try:
        kwargs = ssl_config_kwargs(ssl)
        config = Wav2Vec2Config(num_attention_heads=kwargs["hidden_size"] // HEAD_DIM, **kwargs)
        model = UTMOS22Strong(
            config,
            domain_dim=state["domain_emb"].shape[1],
            judge_dim=state["judge_emb"].shape[1],
            rnn_hidden=state["blstm.weight_hh_l0"].shape[1],
            proj_hidden=state["projection.0.weight"].shape[0],
        )
    except KeyError as err:
        raise ValueError(f"checkpoint lacks parameter {err}") from None
    return load_complete(model, state, "wav2vec2", SSL_PREFIX)
