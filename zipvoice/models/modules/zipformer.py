"""TTSZipformer: the Zipformer2 variant used as ZipVoice's text encoder and flow-matching decoder.

Module names and shapes follow the published checkpoints exactly (see "The model" in
docs/architecture.md). Everything works in (T, B, C) internally. The eval-mode forward
is plain tensor arithmetic with shapes derived from the input, so the model can be traced
and exported to ONNX with dynamic batch and time.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zipvoice.models.modules.fastpath import (
    depthwise_conv1d,
    depthwise_conv1d_as_2d,
    gated_depthwise_conv,
    use_channels_last_conv,
    use_inference_layout,
)
from zipvoice.models.modules.scaling import (
    ActivationDropoutAndLinear,
    Balancer,
    BiasNorm,
    Dropout2,
    FloatLike,
    ScaledLinear,
    ScheduledFloat,
    SwooshR,
    Whiten,
    is_exporting,
    limit_param_value,
    penalize_abs_values_gt,
    softmax,
)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding: cat(cos(t*f), sin(t*f)), f = exp(-ln(max_period)*k/half).

    ``timesteps`` is (N,) -> (N, dim), or (N, T) -> (T, N, dim).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    if timesteps.dim() == 2:
        timesteps = timesteps.transpose(0, 1)
    args = timesteps[..., None].float() * freqs
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[..., :1])], dim=-1)
    return embedding


def _to_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    """An int (or 1-element sequence) is repeated for every stack."""
    if isinstance(value, int):
        return (value,) * length
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * length
    if len(value) != length:
        raise ValueError(f"{name} has {len(value)} entries but there are {length} stacks")
    return value


def _check_u_shape(factors: tuple[int, ...]) -> None:
    """Downsampling factors must start and end at 1, double up to the middle, halve after."""
    ok = factors[0] == 1 and factors[-1] == 1
    mid = len(factors) // 2
    ok = ok and all(factors[i] == factors[i - 1] * 2 for i in range(1, mid + 1))
    ok = ok and all(factors[i] * 2 == factors[i - 1] for i in range(mid + 1, len(factors)))
    if not ok:
        raise ValueError(f"downsampling factors must be U-shaped like (1, 2, 4, 2, 1): {factors}")


def _whitening_schedule(x: float, ratio: float = 2.0) -> ScheduledFloat:
    return ScheduledFloat((0.0, x), (20000.0, ratio * x), default=x)


def _sequence_dropout_mask(module: nn.Module, x: Tensor, rate: float) -> Tensor | None:
    """A (B, 1) keep-mask dropping whole utterances, or None when nothing is dropped."""
    if rate == 0.0 or not module.training or is_exporting():
        return None
    return (torch.rand(x.shape[1], 1, device=x.device) > rate).to(x.dtype)


def _training_rate(module: nn.Module, rate: FloatLike) -> float:
    if not module.training or is_exporting():
        return 0.0
    return float(rate)


class TTSZipformer(nn.Module):
    """in_proj -> stacks of Zipformer2 encoders at U-shaped frame rates -> out_proj.

    With ``use_time_embed`` a sinusoidal embedding of t (plus, for the distilled model, one of
    the guidance scale) conditions every layer.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        downsampling_factor: int | Sequence[int] = (2, 4),
        num_encoder_layers: int | Sequence[int] = 4,
        cnn_module_kernel: int | Sequence[int] = 31,
        encoder_dim: int = 384,
        query_head_dim: int = 24,
        pos_head_dim: int = 4,
        value_head_dim: int = 12,
        num_heads: int = 8,
        feedforward_dim: int = 1536,
        pos_dim: int = 192,
        dropout: FloatLike | None = None,
        warmup_batches: float = 4000.0,
        use_time_embed: bool = True,
        time_embed_dim: int = 192,
        use_guidance_scale_embed: bool = False,
        guidance_scale_embed_dim: int = 192,
        use_conv: bool = True,
    ) -> None:
        super().__init__()
        if dropout is None:
            dropout = ScheduledFloat((0.0, 0.3), (20000.0, 0.1))
        if isinstance(downsampling_factor, int):
            downsampling_factor = (downsampling_factor,)
        downsampling_factor = tuple(int(d) for d in downsampling_factor)
        _check_u_shape(downsampling_factor)
        num_stacks = len(downsampling_factor)
        num_encoder_layers = _to_tuple(num_encoder_layers, num_stacks, "num_encoder_layers")
        cnn_module_kernel = _to_tuple(cnn_module_kernel, num_stacks, "cnn_module_kernel")

        self.downsampling_factor = downsampling_factor
        self.num_encoder_layers = num_encoder_layers
        self.cnn_module_kernel = cnn_module_kernel
        self.encoder_dim = encoder_dim
        self.query_head_dim = query_head_dim
        self.value_head_dim = value_head_dim
        self.num_heads = num_heads
        self.use_time_embed = use_time_embed
        self.use_guidance_scale_embed = use_guidance_scale_embed
        self.time_embed_dim = time_embed_dim
        self.guidance_scale_embed_dim = guidance_scale_embed_dim
        if use_guidance_scale_embed and not use_time_embed:
            raise ValueError("use_guidance_scale_embed requires use_time_embed")

        self.in_proj = nn.Linear(in_dim, encoder_dim)
        self.out_proj = nn.Linear(encoder_dim, out_dim)

        encoders: list[nn.Module] = []
        for i in range(num_stacks):
            layer = Zipformer2EncoderLayer(
                embed_dim=encoder_dim,
                pos_dim=pos_dim,
                num_heads=num_heads,
                query_head_dim=query_head_dim,
                pos_head_dim=pos_head_dim,
                value_head_dim=value_head_dim,
                feedforward_dim=feedforward_dim,
                dropout=dropout,
                cnn_module_kernel=cnn_module_kernel[i],
                use_conv=use_conv,
            )
            encoder: nn.Module = Zipformer2Encoder(
                layer,
                num_encoder_layers[i],
                embed_dim=encoder_dim,
                time_embed_dim=time_embed_dim if use_time_embed else -1,
                pos_dim=pos_dim,
                warmup_begin=warmup_batches * (i + 1) / (num_stacks + 1),
                warmup_end=warmup_batches * (i + 2) / (num_stacks + 1),
                final_layerdrop_rate=0.035 * (downsampling_factor[i] ** 0.5),
            )
            if downsampling_factor[i] != 1:
                encoder = DownsampledZipformer2Encoder(
                    encoder, dim=encoder_dim, downsample=downsampling_factor[i]
                )
            encoders.append(encoder)
        self.encoders = nn.ModuleList(encoders)

        if use_time_embed:
            self.time_embed = nn.Sequential(
                nn.Linear(time_embed_dim, time_embed_dim * 2),
                SwooshR(),
                nn.Linear(time_embed_dim * 2, time_embed_dim),
            )
        else:
            self.time_embed = None
        if use_guidance_scale_embed:
            self.guidance_scale_embed = ScaledLinear(
                guidance_scale_embed_dim, time_embed_dim, bias=False, initial_scale=0.1
            )
        else:
            self.guidance_scale_embed = None

    def forward(
        self,
        x: Tensor,
        t: Tensor | None = None,
        padding_mask: Tensor | None = None,
        guidance_scale: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, in_dim); t, guidance_scale: (B,) or (B, T); padding_mask: (B, T), True
        at padding. Returns (B, T, out_dim)."""
        # contiguous(): a permuted input does not fold into one GEMM when the weight needs no
        # gradient (a model with adapters, or frozen), and matmul would then run one product
        # per frame; a trained weight made it copy anyway.
        x = self.in_proj(x.permute(1, 0, 2).contiguous())
        if padding_mask is not None and not is_exporting() and not bool(padding_mask.any()):
            padding_mask = None  # nothing to mask: skip every layer's masked copies (exact)
        time_emb = None
        if t is not None:
            if self.time_embed is None:
                raise ValueError("this TTSZipformer has no time embedding but t was given")
            time_emb = timestep_embedding(t, self.time_embed_dim)
            if guidance_scale is not None:
                if self.guidance_scale_embed is None:
                    raise ValueError("this TTSZipformer has no guidance-scale embedding")
                time_emb = time_emb + self.guidance_scale_embed(
                    timestep_embedding(guidance_scale, self.guidance_scale_embed_dim)
                )
            time_emb = self.time_embed(time_emb)
        for encoder in self.encoders:
            x = encoder(x, time_emb=time_emb, src_key_padding_mask=padding_mask)
        return self.out_proj(x).permute(1, 0, 2)


class Zipformer2EncoderLayer(nn.Module):
    """One Zipformer2 layer: three feed-forwards, non-linear attention, two self-attentions
    and two convolution modules sharing one set of attention weights, with a mid-layer and a
    final learnable bypass."""

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        value_head_dim: int,
        feedforward_dim: int,
        dropout: FloatLike = 0.1,
        cnn_module_kernel: int = 31,
        use_conv: bool = True,
        attention_skip_rate: FloatLike | None = None,
        conv_skip_rate: FloatLike | None = None,
        const_attention_rate: FloatLike | None = None,
        ff2_skip_rate: FloatLike | None = None,
        ff3_skip_rate: FloatLike | None = None,
        bypass_skip_rate: FloatLike | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim

        def _or(value: FloatLike | None, *points: tuple[float, float], default: float) -> FloatLike:
            return ScheduledFloat(*points, default=default) if value is None else value

        self.attention_skip_rate = _or(
            attention_skip_rate, (0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0), default=0.0
        )
        self.conv_skip_rate = _or(
            conv_skip_rate, (0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0), default=0.0
        )
        self.const_attention_rate = _or(
            const_attention_rate, (0.0, 0.25), (4000.0, 0.025), default=0.0
        )
        self.ff2_skip_rate = _or(
            ff2_skip_rate, (0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0), default=0.0
        )
        self.ff3_skip_rate = _or(
            ff3_skip_rate, (0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0), default=0.0
        )
        bypass_skip_rate = _or(bypass_skip_rate, (0.0, 0.5), (4000.0, 0.02), default=0.0)

        self.bypass = BypassModule(embed_dim, skip_rate=bypass_skip_rate)
        self.bypass_mid = BypassModule(embed_dim)

        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim,
            pos_dim=pos_dim,
            num_heads=num_heads,
            query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim,
            dropout=0.0,
        )
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedforwardModule(embed_dim, (feedforward_dim * 3) // 4, dropout)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, dropout)
        self.feed_forward3 = FeedforwardModule(embed_dim, (feedforward_dim * 5) // 4, dropout)
        self.nonlin_attention = NonlinAttention(embed_dim, hidden_channels=3 * embed_dim // 4)

        self.use_conv = use_conv
        if use_conv:
            self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel)
            self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel)

        self.norm = BiasNorm(embed_dim)

        self.balancer1 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.45, max_positive=0.55,
            min_abs=0.2, max_abs=4.0,
        )  # fmt: skip
        self.balancer_na = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.004), (4000.0, 0.02)), prob=0.05,
        )  # fmt: skip
        self.balancer_ff2 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.1), default=0.0), max_abs=2.0,
            prob=0.05,
        )  # fmt: skip
        self.balancer_ff3 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.3, max_positive=0.7,
            min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.2), default=0.0), max_abs=4.0,
            prob=0.05,
        )  # fmt: skip
        self.whiten = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(4.0, ratio=3.0),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )
        self.balancer2 = Balancer(
            embed_dim, channel_dim=-1, min_positive=0.45, max_positive=0.55,
            min_abs=0.1, max_abs=4.0,
        )  # fmt: skip

    def _skip(self, x: Tensor, rate: FloatLike) -> Tensor:
        mask = _sequence_dropout_mask(self, x, _training_rate(self, rate))
        return x if mask is None else x * mask

    def forward(
        self,
        src: Tensor,
        pos_emb: Tensor,
        time_emb: Tensor | None = None,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """src: (T, B, C); pos_emb: (1, 2T-1, pos_dim); time_emb: (B, C) or (T, B, C)."""
        src_orig = src
        attn_weights = self.self_attn_weights(
            src, pos_emb=pos_emb, attn_mask=attn_mask, key_padding_mask=src_key_padding_mask
        )
        if time_emb is not None:
            src = src + time_emb
        src = src + self.feed_forward1(src)

        attn_dropout_mask = _sequence_dropout_mask(
            self, src, _training_rate(self, self.attention_skip_rate)
        )

        selected_attn_weights = attn_weights[0:1]
        if (
            self.training
            and not is_exporting()
            and random.random() < float(self.const_attention_rate)
        ):
            # Uniform weights over the unmasked frames: nudges the module towards averaging.
            selected_attn_weights = (selected_attn_weights > 0.0).to(selected_attn_weights.dtype)
            selected_attn_weights = selected_attn_weights * (
                1.0 / selected_attn_weights.sum(dim=-1, keepdim=True)
            )
        na = self.balancer_na(self.nonlin_attention(src, selected_attn_weights))
        src = src + (na if attn_dropout_mask is None else na * attn_dropout_mask)

        self_attn = self.self_attn1(src, attn_weights)
        src = src + (self_attn if attn_dropout_mask is None else self_attn * attn_dropout_mask)

        if self.use_conv:
            if time_emb is not None:
                src = src + time_emb
            src = src + self._skip(
                self.conv_module1(src, src_key_padding_mask=src_key_padding_mask),
                self.conv_skip_rate,
            )

        src = src + self._skip(self.balancer_ff2(self.feed_forward2(src)), self.ff2_skip_rate)
        src = self.bypass_mid(src_orig, src)

        self_attn = self.self_attn2(src, attn_weights)
        src = src + (self_attn if attn_dropout_mask is None else self_attn * attn_dropout_mask)

        if self.use_conv:
            if time_emb is not None:
                src = src + time_emb
            src = src + self._skip(
                self.conv_module2(src, src_key_padding_mask=src_key_padding_mask),
                self.conv_skip_rate,
            )

        src = src + self._skip(self.balancer_ff3(self.feed_forward3(src)), self.ff3_skip_rate)
        src = self.balancer1(src)
        src = self.norm(src)
        src = self.bypass(src_orig, src)
        src = self.balancer2(src)
        return self.whiten(src)


class Zipformer2Encoder(nn.Module):
    """A stack of identical layers sharing one relative positional encoding and one
    projection of the time embedding."""

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        embed_dim: int,
        time_embed_dim: int,
        pos_dim: int,
        warmup_begin: float,
        warmup_end: float,
        initial_layerdrop_rate: float = 0.5,
        final_layerdrop_rate: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0 <= warmup_begin <= warmup_end:
            raise ValueError(f"need 0 <= warmup_begin <= warmup_end: {warmup_begin}, {warmup_end}")
        self.encoder_pos = CompactRelPositionalEncoding(pos_dim, dropout_rate=0.15)
        if time_embed_dim != -1:
            self.time_emb = nn.Sequential(SwooshR(), nn.Linear(time_embed_dim, embed_dim))
        else:
            self.time_emb = None
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

        # Layer skipping warms up layer by layer over [warmup_begin, warmup_end].
        delta = (warmup_end - warmup_begin) / num_layers
        cur_begin = warmup_begin
        for layer in self.layers:
            cur_end = cur_begin + delta
            layer.bypass.skip_rate = ScheduledFloat(
                (cur_begin, initial_layerdrop_rate),
                (cur_end, final_layerdrop_rate),
                default=0.0,
            )
            cur_begin = cur_end

    def forward(
        self,
        src: Tensor,
        time_emb: Tensor | None = None,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        pos_emb = self.encoder_pos(src)
        if self.time_emb is not None:
            if time_emb is None:
                raise ValueError("this encoder stack needs a time embedding")
            time_emb = self.time_emb(time_emb)
        elif time_emb is not None:
            raise ValueError("this encoder stack takes no time embedding")
        output = src
        for layer in self.layers:
            output = layer(
                output,
                pos_emb,
                time_emb=time_emb,
                attn_mask=attn_mask,
                src_key_padding_mask=src_key_padding_mask,
            )
        return output


class BypassModule(nn.Module):
    """out = src_orig + (src - src_orig) * bypass_scale, per channel.

    In training the scale is kept inside [scale_min, scale_max] and whole utterances are
    skipped (scale 0) with probability ``skip_rate``.
    """

    def __init__(
        self,
        embed_dim: int,
        skip_rate: FloatLike = 0.0,
        straight_through_rate: FloatLike = 0.0,
        scale_min: FloatLike | None = None,
        scale_max: FloatLike = 1.0,
    ) -> None:
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.skip_rate = copy.deepcopy(skip_rate)
        self.straight_through_rate = copy.deepcopy(straight_through_rate)
        if scale_min is None:
            scale_min = ScheduledFloat((0.0, 0.9), (20000.0, 0.2), default=0.0)
        self.scale_min = scale_min
        self.scale_max = scale_max

    def _get_bypass_scale(self, batch_size: int) -> Tensor:
        if not self.training or is_exporting():
            return self.bypass_scale
        scale = limit_param_value(
            self.bypass_scale, min=float(self.scale_min), max=float(self.scale_max)
        )
        skip_rate = float(self.skip_rate)
        if skip_rate != 0.0:
            keep = torch.rand((batch_size, 1), device=scale.device) > skip_rate
            scale = scale * keep
        straight_through_rate = float(self.straight_through_rate)
        if straight_through_rate != 0.0:
            through = torch.rand((batch_size, 1), device=scale.device) < straight_through_rate
            scale = torch.maximum(scale, through.to(scale.dtype))
        return scale

    def forward(self, src_orig: Tensor, src: Tensor) -> Tensor:
        return src_orig + (src - src_orig) * self._get_bypass_scale(src.shape[1])


class DownsampledZipformer2Encoder(nn.Module):
    """Runs an encoder stack at 1/downsample of the frame rate, upsamples by repetition and
    combines with the input through a bypass."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int) -> None:
        super().__init__()
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(downsample)
        self.num_layers = encoder.num_layers
        self.encoder = encoder
        self.upsample = SimpleUpsample(downsample)
        self.out_combiner = BypassModule(dim)

    def forward(
        self,
        src: Tensor,
        time_emb: Tensor | None = None,
        attn_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        src_orig = src
        ds = self.downsample_factor
        src = self.downsample(src)
        if time_emb is not None and time_emb.dim() == 3:
            time_emb = time_emb[::ds]
        if attn_mask is not None:
            attn_mask = attn_mask[::ds, ::ds]
        if src_key_padding_mask is not None:
            src_key_padding_mask = src_key_padding_mask[..., ::ds]
        src = self.encoder(
            src, time_emb=time_emb, attn_mask=attn_mask, src_key_padding_mask=src_key_padding_mask
        )
        src = self.upsample(src)[: src_orig.shape[0]]
        return self.out_combiner(src_orig, src)


class SimpleDownsample(nn.Module):
    """Weighted sum (softmax of ``bias``) over each group of ``downsample`` frames; the
    sequence is right-padded by repeating its last frame."""

    def __init__(self, downsample: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(downsample))
        self.downsample = downsample
        self.name: str | None = None

    def forward(self, src: Tensor) -> Tensor:
        """(T, B, C) -> ((T + ds - 1) // ds, B, C)."""
        seq_len, batch_size, channels = src.shape
        ds = self.downsample
        d_seq_len = (seq_len + ds - 1) // ds
        # Index-based padding (clamp to the last frame) keeps the length symbolic for export.
        index = torch.arange(d_seq_len * ds, device=src.device).clamp(max=seq_len - 1)
        src = src.index_select(0, index).reshape(d_seq_len, ds, batch_size, channels)
        weights = self.bias.softmax(dim=0).unsqueeze(-1).unsqueeze(-1)
        return (src * weights).sum(dim=1)


class SimpleUpsample(nn.Module):
    """Repeats every frame ``upsample`` times."""

    def __init__(self, upsample: int) -> None:
        super().__init__()
        self.upsample = upsample

    def forward(self, src: Tensor) -> Tensor:
        seq_len, batch_size, channels = src.shape
        src = src.unsqueeze(1).expand(seq_len, self.upsample, batch_size, channels)
        return src.reshape(seq_len * self.upsample, batch_size, channels)


class CompactRelPositionalEncoding(nn.Module):
    """Relative positional encoding of the 2T-1 offsets -(T-1)..T-1.

    Offsets are log-compressed beyond about sqrt(dim) and mapped through atan to a finite
    interval before a Fourier basis, so nearby offsets stay distinct while far ones blur.
    Computed from T on every call (no cache), so it follows dynamic lengths under export.
    """

    def __init__(
        self,
        embed_dim: int,
        dropout_rate: FloatLike,
        max_len: int = 1000,
        length_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"positional encoding dim must be even, got {embed_dim}")
        if length_factor < 1.0:
            raise ValueError(f"length_factor must be >= 1.0, got {length_factor}")
        self.embed_dim = embed_dim
        self.dropout = Dropout2(dropout_rate)
        self.length_factor = length_factor
        self.max_len = max_len  # kept for signature compatibility; nothing is cached

    def encode_offsets(self, offsets: Tensor) -> Tensor:
        """(N,) float offsets -> (N, embed_dim)."""
        x = offsets.to(torch.float32).unsqueeze(1)
        freqs = 1 + torch.arange(self.embed_dim // 2, device=x.device, dtype=torch.float32)
        compression_length = self.embed_dim**0.5
        x_compressed = (
            compression_length
            * x.sign()
            * ((x.abs() + compression_length).log() - math.log(compression_length))
        )
        length_scale = self.length_factor * self.embed_dim / (2.0 * math.pi)
        x_atan = (x_compressed / length_scale).atan()
        angles = x_atan * freqs
        # Interleave: channel 2k = cos((k+1)a), 2k+1 = sin((k+1)a); last channel is a bias (1.0).
        pe = torch.stack([angles.cos(), angles.sin()], dim=-1).reshape(x.shape[0], self.embed_dim)
        return torch.cat([pe[:, :-1], torch.ones_like(pe[:, :1])], dim=1)

    def forward(self, x: Tensor, left_context_len: int = 0) -> Tensor:
        """x: (T, B, *) -> (1, left_context_len + 2T - 1, embed_dim)."""
        seq_len = x.shape[0]
        offsets = torch.arange(
            -(seq_len + left_context_len - 1), seq_len, device=x.device, dtype=torch.float32
        )
        pos_emb = self.encode_offsets(offsets).to(x.dtype).unsqueeze(0)
        return self.dropout(pos_emb)


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Multi-head attention weights with relative positional scores.

    scores = q.k + p.pos(j - i) (no 1/sqrt(d): the scale lives in in_proj's initialisation);
    masked keys get -1000 before the softmax. Returns (H, B, T, T).
    """

    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        dropout: float = 0.0,
        pos_emb_skip_rate: FloatLike | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.query_head_dim = query_head_dim
        self.pos_head_dim = pos_head_dim
        self.dropout = dropout
        if pos_emb_skip_rate is None:
            pos_emb_skip_rate = ScheduledFloat((0.0, 0.5), (4000.0, 0.0))
        self.pos_emb_skip_rate = pos_emb_skip_rate
        self.name: str | None = None

        key_head_dim = query_head_dim
        in_proj_dim = (query_head_dim + key_head_dim + pos_head_dim) * num_heads
        self.in_proj = ScaledLinear(
            embed_dim, in_proj_dim, bias=True, initial_scale=query_head_dim**-0.25
        )
        self.whiten_keys = Whiten(
            num_groups=num_heads,
            whitening_limit=_whitening_schedule(3.0),
            prob=(0.025, 0.25),
            grad_scale=0.025,
        )
        # The weights are invariant to a constant on the keys, so keep the keys' mean near 0.
        self.balance_keys = Balancer(
            key_head_dim * num_heads,
            channel_dim=-1,
            min_positive=0.4,
            max_positive=0.6,
            min_abs=0.0,
            max_abs=100.0,
            prob=0.025,
        )
        self.linear_pos = ScaledLinear(
            pos_dim, num_heads * pos_head_dim, bias=False, initial_scale=0.05
        )

    def forward(
        self,
        x: Tensor,
        pos_emb: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (T, B, C); pos_emb: (1 or B, 2T-1, pos_dim); key_padding_mask: (B, T), True at
        padding; attn_mask: (T, T) or (B, T, T), True where not allowed."""
        x = self.in_proj(x)
        num_heads = self.num_heads
        query_head_dim = self.query_head_dim
        pos_head_dim = self.pos_head_dim
        seq_len, batch_size, _ = x.shape
        query_dim = query_head_dim * num_heads

        q = x[..., 0:query_dim]
        k = self.whiten_keys(self.balance_keys(x[..., query_dim : 2 * query_dim]))
        p = x[..., 2 * query_dim :]

        q = q.reshape(seq_len, batch_size, num_heads, query_head_dim).permute(2, 1, 0, 3)
        p = p.reshape(seq_len, batch_size, num_heads, pos_head_dim).permute(2, 1, 0, 3)
        k = k.reshape(seq_len, batch_size, num_heads, query_head_dim).permute(2, 1, 3, 0)

        use_pos_scores = (
            not self.training or is_exporting() or random.random() >= float(self.pos_emb_skip_rate)
        )
        pos = None
        if use_pos_scores:
            pos = self.linear_pos(pos_emb)
            pos = pos.reshape(pos.shape[0], -1, num_heads, pos_head_dim).permute(2, 0, 3, 1)
        if not is_exporting() and not (torch.is_grad_enabled() and x.requires_grad):
            return _blocked_attention_weights(q, k, p, pos, key_padding_mask, attn_mask)

        attn_scores = torch.matmul(q, k)  # (H, B, T, T)
        if pos is not None and is_exporting():
            attn_scores = attn_scores + self._rel_scores_for_export(p, pos, seq_len)
        elif pos is not None:
            pos_scores = torch.matmul(p, pos)  # (H, B, T, 2T-1), column c = offset c-(T-1)
            attn_scores = attn_scores + self._rel_to_abs(pos_scores, seq_len)

        if self.training and not is_exporting() and random.random() < 0.1:
            attn_scores = penalize_abs_values_gt(attn_scores, limit=25.0, penalty=1.0e-04)

        # -1000 (not -inf) so fully masked rows stay finite; exp(-1000) is exactly 0.
        if attn_mask is not None:
            attn_scores = attn_scores.masked_fill(attn_mask, -1000.0)
        if key_padding_mask is not None:
            attn_scores = attn_scores.masked_fill(key_padding_mask.unsqueeze(1), -1000.0)

        attn_weights = softmax(attn_scores, dim=-1)
        if self.training and self.dropout > 0.0:
            attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=True)
        return attn_weights

    @staticmethod
    def _rel_scores_for_export(p: Tensor, pos: Tensor, seq_len: int) -> Tensor:
        """The positional scores (H, B, T, T), [i, j] at offset j - i, in ops an ONNX runtime
        runs as plain copies instead of a gather with a (H, B, T, T) index.

        With one unused column appended to pos, row i of the (H, B, T, 2T) scores holds offset
        j - i at column T-1-i+j, so flat position (T-1) + i*(2T-1) + j: one contiguous slice of
        the flattened scores, read as rows of 2T-1, whose first T columns are the answer.
        """
        pos = nn.functional.pad(pos, (0, 1))  # (H, 1 or B, dp, 2T)
        scores = torch.matmul(p, pos)  # (H, B, T, 2T)
        num_heads, batch_size = scores.shape[0], scores.shape[1]
        start = seq_len - 1
        flat = scores.reshape(num_heads, batch_size, -1)
        flat = flat[..., start : start + seq_len * (2 * seq_len - 1)]
        return flat.reshape(num_heads, batch_size, seq_len, 2 * seq_len - 1)[..., :seq_len]

    @staticmethod
    def _rel_to_abs(pos_scores: Tensor, seq_len: int) -> Tensor:
        """(H, B, T, 2T-1) by relative offset -> (H, B, T, T): [i, j] takes offset j - i."""
        num_heads, batch_size = pos_scores.shape[:2]
        # Zero-copy view: step one row down and one column left per query.
        pos_scores = pos_scores.contiguous()
        return pos_scores.as_strided(
            (num_heads, batch_size, seq_len, seq_len),
            (
                pos_scores.stride(0),
                pos_scores.stride(1),
                pos_scores.stride(2) - pos_scores.stride(3),
                pos_scores.stride(3),
            ),
            storage_offset=pos_scores.storage_offset() + pos_scores.stride(3) * (seq_len - 1),
        )


# Elements of one block of attention scores (H * B * rows * T) in the no-gradient path: about
# 4 MiB, so the temporaries come from the allocator's reused heap instead of fresh pages.
_SCORE_BLOCK_ELEMENTS = 1 << 20


def _blocked_attention_weights(
    q: Tensor,
    k: Tensor,
    p: Tensor,
    pos: Tensor | None,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
) -> Tensor:
    """The attention weights (H, B, T, T) computed a block of query rows at a time, for the
    paths that need no gradient (inference, a teacher under no_grad).

    Same arithmetic as the autograd path (scores = q.k + p.pos(j - i), masked, softmax), but
    only the final weights are allocated at full size: the (H, B, T, 2T-1) positional scores,
    the summed scores and the masked copy never exist, which at T = 1200 saves ~300 MB of
    freshly faulted memory per layer, and each block's positional product covers only the
    T + rows - 1 offsets that block uses instead of all 2T - 1.
    q: (H, B, T, dq); k: (H, B, dq, T); p: (H, B, T, dp); pos: (H, 1 or B, dp, 2T-1).
    """
    num_heads, batch_size, seq_len, _ = q.shape
    weights = q.new_empty(num_heads, batch_size, seq_len, seq_len)
    rows = max(1, min(seq_len, _SCORE_BLOCK_ELEMENTS // max(1, num_heads * batch_size * seq_len)))
    padding = None if key_padding_mask is None else key_padding_mask.unsqueeze(1)
    for start in range(0, seq_len, rows):
        end = min(seq_len, start + rows)
        n = end - start
        scores = torch.matmul(q[:, :, start:end], k)  # (H, B, n, T)
        if pos is not None:
            # Row i needs offsets j - i for j in [0, T): columns T-1-i .. 2T-2-i of pos.
            first = seq_len - end
            block = torch.matmul(p[:, :, start:end], pos[..., first : first + seq_len + n - 1])
            block = block.contiguous()
            scores.add_(
                block.as_strided(
                    (num_heads, batch_size, n, seq_len),
                    (block.stride(0), block.stride(1), block.stride(2) - 1, 1),
                    storage_offset=block.storage_offset() + n - 1,
                )
            )
        if attn_mask is not None:
            scores.masked_fill_(attn_mask[..., start:end, :], -1000.0)
        if padding is not None:
            scores.masked_fill_(padding, -1000.0)
        weights[:, :, start:end] = scores.softmax(dim=-1)
    return weights


class SelfAttention(nn.Module):
    """Per-head weighted sum of projected values using precomputed attention weights."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim, bias=True)
        self.out_proj = ScaledLinear(
            num_heads * value_head_dim, embed_dim, bias=True, initial_scale=0.05
        )
        self.whiten = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(7.5, ratio=3.0),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        """x: (T, B, C); attn_weights: (H, B, T, T)."""
        seq_len, batch_size, _ = x.shape
        num_heads = attn_weights.shape[0]
        x = self.in_proj(x)
        x = x.reshape(seq_len, batch_size, num_heads, -1).permute(2, 1, 0, 3)
        x = torch.matmul(attn_weights, x)  # (H, B, T, value_head_dim)
        x = x.permute(2, 1, 0, 3).reshape(seq_len, batch_size, -1)
        return self.whiten(self.out_proj(x))


class FeedforwardModule(nn.Module):
    """in_proj -> SwooshL -> dropout -> out_proj."""

    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: FloatLike) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.hidden_balancer = Balancer(
            feedforward_dim,
            channel_dim=-1,
            min_positive=0.3,
            max_positive=1.0,
            min_abs=0.75,
            max_abs=5.0,
        )
        # dropout_shared_dim=0: one dropout mask for all frames.
        self.out_proj = ActivationDropoutAndLinear(
            feedforward_dim,
            embed_dim,
            activation="SwooshL",
            dropout_p=dropout,
            dropout_shared_dim=0,
            bias=True,
            initial_scale=0.1,
        )
        self.out_whiten = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(7.5),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.hidden_balancer(self.in_proj(x))
        return self.out_whiten(self.out_proj(x, consume_input=True))


class NonlinAttention(nn.Module):
    """Like the convolution module but with attention (head 0's weights) in place of the
    convolution: (x * tanh(s)) summed over time with the weights, times y."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, hidden_channels * 3, bias=True)
        self.balancer = Balancer(
            hidden_channels,
            channel_dim=-1,
            min_positive=ScheduledFloat((0.0, 0.25), (20000.0, 0.05)),
            max_positive=ScheduledFloat((0.0, 0.75), (20000.0, 0.95)),
            min_abs=0.5,
            max_abs=5.0,
        )
        self.tanh = nn.Tanh()
        self.out_proj = ScaledLinear(hidden_channels, channels, bias=True, initial_scale=0.05)
        self.whiten1 = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(5.0),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )
        self.whiten2 = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(5.0, ratio=3.0),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        """x: (T, B, C); attn_weights: (1, B, T, T)."""
        x = self.in_proj(x)
        seq_len, batch_size, _ = x.shape
        s, x, y = x.chunk(3, dim=2)
        s = self.tanh(self.balancer(s))
        x = self.whiten1(x) * s
        num_heads = attn_weights.shape[0]
        x = x.reshape(seq_len, batch_size, num_heads, -1).permute(2, 1, 0, 3)
        x = torch.matmul(attn_weights, x)
        x = x.permute(2, 1, 0, 3).reshape(seq_len, batch_size, -1)
        x = x * y
        # As for TTSZipformer's in_proj: one GEMM even for a frozen weight (4x fewer seconds
        # than matmul's per-frame products at 2 x 1219 frames).
        return self.whiten2(self.out_proj(x.contiguous()))


class ConvolutionModule(nn.Module):
    """GLU-style gate -> zero padded frames -> depthwise conv -> SwooshR -> linear."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"convolution kernel size must be odd, got {kernel_size}")
        bottleneck_dim = channels
        self.in_proj = nn.Linear(channels, 2 * bottleneck_dim)
        self.balancer1 = Balancer(
            bottleneck_dim,
            channel_dim=-1,
            min_positive=ScheduledFloat((0.0, 0.05), (8000.0, 0.025)),
            max_positive=1.0,
            min_abs=1.5,
            max_abs=ScheduledFloat((0.0, 5.0), (8000.0, 10.0), default=1.0),
        )
        self.sigmoid = nn.Sigmoid()
        self.depthwise_conv = nn.Conv1d(
            in_channels=bottleneck_dim,
            out_channels=bottleneck_dim,
            groups=bottleneck_dim,
            kernel_size=kernel_size,
            padding=kernel_size // 2,
        )
        self.balancer2 = Balancer(
            bottleneck_dim,
            channel_dim=1,
            min_positive=ScheduledFloat((0.0, 0.1), (8000.0, 0.05)),
            max_positive=1.0,
            min_abs=ScheduledFloat((0.0, 0.2), (20000.0, 0.5)),
            max_abs=10.0,
        )
        self.whiten = Whiten(
            num_groups=1,
            whitening_limit=_whitening_schedule(7.5),
            prob=(0.025, 0.25),
            grad_scale=0.01,
        )
        self.out_proj = ActivationDropoutAndLinear(
            bottleneck_dim, channels, activation="SwooshR", dropout_p=0.0, initial_scale=0.05
        )

    def forward(self, x: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (T, B, C); src_key_padding_mask: (B, T), True at padding."""
        x = self.in_proj(x)
        x, s = x.chunk(2, dim=2)
        if use_inference_layout(x):  # the same numbers in a faster layout
            x = gated_depthwise_conv(
                self.depthwise_conv, x, self.sigmoid(self.balancer1(s)), src_key_padding_mask
            )
            x = self.balancer2(x)
            return self.out_proj(self.whiten(x.permute(2, 0, 1)), consume_input=True)
        x = x * self.sigmoid(self.balancer1(s))
        x = x.permute(1, 2, 0)  # (B, C, T)
        if src_key_padding_mask is not None:
            x = x.masked_fill(src_key_padding_mask.unsqueeze(1), 0.0)
        if use_channels_last_conv(self.depthwise_conv, x):
            x = depthwise_conv1d(self.depthwise_conv, x)  # the same numbers, faster
        elif torch.onnx.is_in_onnx_export():
            x = depthwise_conv1d_as_2d(self.depthwise_conv, x)  # faster in onnxruntime
        else:
            x = self.depthwise_conv(x)
        x = self.balancer2(x).permute(2, 0, 1)  # (T, B, C)
        return self.out_proj(self.whiten(x), consume_input=True)
