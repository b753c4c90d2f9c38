"""The speaker-verification model behind upstream's SIM-o: WavLM-large features (a learnt
softmax mix of all hidden states) into an ECAPA-TDNN head, trained on VoxCeleb by UniSpeech
and published as `wavlm_large_finetune.pth` (k2-fsa/TTS_eval_models, `speaker_similarity/`).

The head is written here against that checkpoint's parameter names (`layer1.conv.weight`,
`layer2.Res2Conv1dReluBn.convs.0.weight`, `pooling.linear1.weight`, ...). WavLM itself comes
from `transformers` (`WavLMModel`); the checkpoint stores it under `feature_extract.model.*` in
the original (unilm/fairseq) naming, so `fairseq_key_to_hf` renames those keys. Its hidden states
match what the checkpoint was trained on: the input of each of the 24 layers, then the final
layer-normed output (25 in all)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

WAVLM_PREFIX = "feature_extract.model."


class Conv1dReluBn(nn.Module):
    """Conv1d, then ReLU, then BatchNorm (the order the checkpoint was trained with)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1dReluBn(nn.Module):
    """Res2Net block: channels split into `scale` groups, each group's conv also sees the
    previous group's output (a growing receptive field); the last group passes through."""

    def __init__(self, channels: int, kernel: int, padding: int, dilation: int, scale: int):
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels {channels} not divisible by scale {scale}")
        self.width = channels // scale
        self.nums = scale - 1 if scale > 1 else 1
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel, padding=padding, dilation=dilation)
            for _ in range(self.nums)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.nums))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.width, dim=1)
        outs = []
        carry = None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            carry = pieces[i] if carry is None else carry + pieces[i]
            carry = bn(F.relu(conv(carry)))
            outs.append(carry)
        if len(pieces) > self.nums:
            outs.append(pieces[self.nums])
        return torch.cat(outs, dim=1)


class SEConnect(nn.Module):
    """Squeeze-excitation: a per-channel gate computed from the time-averaged input."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    """1x1 conv, Res2 conv, 1x1 conv, SE gate, plus the residual (the checkpoint's names)."""

    def __init__(self, channels: int, dilation: int, scale: int = 8, se_bottleneck: int = 128):
        super().__init__()
        self.Conv1dReluBn1 = Conv1dReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2Conv1dReluBn(channels, 3, dilation, dilation, scale)
        self.Conv1dReluBn2 = Conv1dReluBn(channels, channels)
        self.SE_Connect = SEConnect(channels, se_bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x)))
        return self.SE_Connect(y) + x


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over time (1x1 convs as the linears)."""

    def __init__(self, channels: int, attention_channels: int = 128):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention_channels, kernel_size=1)
        self.linear2 = nn.Conv1d(attention_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
        mean = (alpha * x).sum(dim=2)
        var = (alpha * x.square()).sum(dim=2) - mean.square()
        return torch.cat([mean, var.clamp(min=1e-9).sqrt()], dim=1)


class EcapaTdnnHead(nn.Module):
    """ECAPA-TDNN over a (batch, feat_dim, frames) feature sequence -> (batch, emb_dim)."""

    def __init__(
        self,
        feat_dim: int = 1024,
        channels: int = 512,
        emb_dim: int = 256,
        pool_channels: int = 1536,
        se_bottleneck: int = 128,
    ):
        super().__init__()
        self.instance_norm = nn.InstanceNorm1d(feat_dim)
        self.layer1 = Conv1dReluBn(feat_dim, channels, kernel=5, padding=2)
        self.layer2 = SERes2Block(channels, dilation=2, se_bottleneck=se_bottleneck)
        self.layer3 = SERes2Block(channels, dilation=3, se_bottleneck=se_bottleneck)
        self.layer4 = SERes2Block(channels, dilation=4, se_bottleneck=se_bottleneck)
        self.conv = nn.Conv1d(channels * 3, pool_channels, kernel_size=1)
        self.pooling = AttentiveStatsPool(pool_channels, attention_channels=se_bottleneck)
        self.bn = nn.BatchNorm1d(pool_channels * 2)
        self.linear = nn.Linear(pool_channels * 2, emb_dim)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        x1 = self.layer1(self.instance_norm(feats))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        out = F.relu(self.conv(torch.cat([x2, x3, x4], dim=1)))
        return self.linear(self.bn(self.pooling(out)))


# Original (unilm/fairseq) WavLM and wav2vec 2.0 parameter names -> transformers' WavLMModel /
# Wav2Vec2Model names (wav2vec 2.0 simply lacks the relative-position ones). `None` drops
# pre-training-only parameters (quantiser, projection heads) inference never uses.
_WAVLM_RULES: list[tuple[str, str | None]] = [
    (r"mask_emb", "masked_spec_embed"),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.0\.(\w+)",
        r"feature_extractor.conv_layers.\1.conv.\2",
    ),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(\w+)",
        r"feature_extractor.conv_layers.\1.layer_norm.\2",
    ),
    (
        r"feature_extractor\.conv_layers\.0\.2\.(\w+)",
        r"feature_extractor.conv_layers.0.layer_norm.\1",
    ),
    (r"layer_norm\.(\w+)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(\w+)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.(\w+)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.([kvq]|out)_proj\.(\w+)",
        r"encoder.layers.\1.attention.\2_proj.\3",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(\w+)",
        r"encoder.layers.\1.attention.gru_rel_pos_linear.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.grep_a",
        r"encoder.layers.\1.attention.gru_rel_pos_const",
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.(\w+)",
        r"encoder.layers.\1.attention.rel_attn_embed.\2",
    ),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"encoder.layers.\1.layer_norm.\2"),
    (
        r"encoder\.layers\.(\d+)\.fc1\.(\w+)",
        r"encoder.layers.\1.feed_forward.intermediate_dense.\2",
    ),
    (r"encoder\.layers\.(\d+)\.fc2\.(\w+)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"(final_proj|label_embs_concat|quantizer|project_q)(\..*)?", None),
]
# transformers registers the positional conv's weight norm as a parametrization (newer) or as
# weight_g / weight_v (older); the original checkpoint always has weight_g / weight_v.
_WEIGHT_NORM_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def fairseq_key_to_hf(key: str, hf_keys: set[str]) -> str | None:
    """The transformers name of original WavLM / wav2vec 2.0 parameter `key` (prefix already
    removed), or None for a parameter inference does not use. Unknown names raise KeyError."""
    for pattern, target in _WAVLM_RULES:
        if re.fullmatch(pattern, key):
            if target is None:
                return None
            name = re.sub(pattern, target, key)
            stem, _, last = name.rpartition(".")
            if name not in hf_keys and last in _WEIGHT_NORM_NAMES:
                name = f"{stem}.{_WEIGHT_NORM_NAMES[last]}"
            return name
    raise KeyError(key)


class EcapaTdnnWavLM(EcapaTdnnHead):
    """WavLM hidden states, mixed by softmax(feature_weight), into the ECAPA-TDNN head.
    The head's parameters sit at the top level, as in the published checkpoint."""

    def __init__(self, wavlm_config, **head_kwargs: int):
        from transformers import WavLMModel

        super().__init__(feat_dim=wavlm_config.hidden_size, **head_kwargs)
        wavlm_config.layerdrop = 0.0
        wavlm_config.apply_spec_augment = False
        self.wavlm = WavLMModel(wavlm_config)
        self.feature_weight = nn.Parameter(torch.zeros(wavlm_config.num_hidden_layers + 1))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(batch, samples) 16 kHz waveform -> (batch, emb_dim) embedding (not normalised)."""
        hidden = self.wavlm(wav, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden, dim=0)  # (layers + 1, batch, frames, dim)
        weights = torch.softmax(self.feature_weight, dim=0).view(-1, 1, 1, 1)
        feats = (weights * stacked).sum(dim=0).transpose(1, 2) + 1e-6
        return self.embed_features(feats)


def head_kwargs_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The head's sizes, read from the checkpoint's tensor shapes."""
    return {
        "channels": state["layer1.conv.weight"].shape[0],
        "emb_dim": state["linear.weight"].shape[0],
        "pool_channels": state["conv.weight"].shape[0],
        "se_bottleneck": state["layer2.SE_Connect.linear1.weight"].shape[0],
    }


def ssl_config_kwargs(ssl: dict[str, torch.Tensor]) -> dict:
    """transformers config arguments shared by WavLM and wav2vec 2.0, read from the shapes of
    original-layout weights. The conv strides are the standard (5, 2, 2, 2, 2, 2, 2) of both."""
    conv = sorted(
        (int(m.group(1)), t.shape)
        for k, t in ssl.items()
        if (m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", k))
    )
    if len(conv) != 7:
        raise ValueError(f"expected 7 feature-extractor conv layers, found {len(conv)}")
    layers = {int(m.group(1)) for k in ssl if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    pos_v = ssl["encoder.pos_conv.0.weight_v"]
    hidden = ssl["post_extract_proj.weight"].shape[0]
    layer_norm = "feature_extractor.conv_layers.0.2.1.weight" in ssl
    return dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        intermediate_size=ssl["encoder.layers.0.fc1.weight"].shape[0],
        conv_dim=[shape[0] for _, shape in conv],
        conv_kernel=[shape[2] for _, shape in conv],
        conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_bias="feature_extractor.conv_layers.0.0.bias" in ssl,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,  # large models: both; base models: neither
        num_conv_pos_embeddings=pos_v.shape[2],
        num_conv_pos_embedding_groups=hidden // pos_v.shape[1],
    )


def wavlm_config_from_state(wavlm: dict[str, torch.Tensor]):
    """A transformers WavLMConfig matching original-layout WavLM weights."""
    from transformers import WavLMConfig

    return WavLMConfig(
        num_attention_heads=wavlm["encoder.layers.0.self_attn.grep_a"].shape[1],
        num_buckets=wavlm["encoder.layers.0.self_attn.relative_attention_bias.weight"].shape[0],
        **ssl_config_kwargs(wavlm),
    )


def load_complete(
    model: nn.Module, state: dict[str, torch.Tensor], ssl_attr: str, prefix: str
) -> nn.Module:
    """Loads `state` (checkpoint layout: the SSL model's original-layout weights under
    `prefix`, everything else under its own name) into `model`, whose transformers SSL model
    is `model.<ssl_attr>`. Missing or unexpected parameters are a ValueError naming them, so a
    wrong file never yields silently random scores."""
    hf_keys = set(getattr(model, ssl_attr).state_dict())
    own = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            own[key] = tensor
            continue
        try:
            name = fairseq_key_to_hf(key[len(prefix) :], hf_keys)
        except KeyError:
            raise ValueError(f"unknown parameter {key}") from None
        if name is not None and (name in hf_keys or not name.endswith("masked_spec_embed")):
            own[f"{ssl_attr}.{name}"] = tensor
    missing, unexpected = model.load_state_dict(own, strict=False)
    # Unused at inference: BatchNorm's step counter, the pre-training mask embedding.
    unused = ("num_batches_tracked", "masked_spec_embed")
    missing = [k for k in missing if not k.endswith(unused)]
    if missing or unexpected:
        raise ValueError(f"parameters missing: {missing[:5]}, unexpected: {unexpected[:5]}")
    return model.eval()


def build_from_state(state: dict[str, torch.Tensor]) -> EcapaTdnnWavLM:
    """The model with every parameter taken from `state` (the published checkpoint's layout:
    head keys at the top level, WavLM under `feature_extract.model.`)."""
    wavlm = {k[len(WAVLM_PREFIX) :]: t for k, t in state.items() if k.startswith(WAVLM_PREFIX)}
    if not wavlm:
        raise ValueError(f"no WavLM weights ({WAVLM_PREFIX}*) in the checkpoint")
    try:
        model = EcapaTdnnWavLM(wavlm_config_from_state(wavlm), **head_kwargs_from_state(state))
    except KeyError as err:
        raise ValueError(f"checkpoint lacks parameter {err}") from None
    return load_complete(model, state, "wavlm", WAVLM_PREFIX)
