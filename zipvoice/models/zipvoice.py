"""ZipVoice: zero-shot TTS by flow matching, conditioned on text and a speech prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from zipvoice.models.modules.solver import EulerSolver
from zipvoice.models.modules.zipformer import TTSZipformer


def make_pad_mask(lengths: Tensor, max_len: int = 0) -> Tensor:
    """(B,) lengths -> (B, max(max_len, longest)) bool mask, True at padding."""
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    max_len = max(int(max_len), int(lengths.max()))
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(-1)


def pad_labels(tokens: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Tensor:
    """Pads each list with one extra ``pad_id`` and then to the longest list: (B, S+1).

    The extra pad position gives every utterance a slot that absorbs the leftover frames
    when durations are spread evenly over tokens.
    """
    length = max(len(ids) for ids in tokens) + 1
    padded = [list(ids) + [pad_id] * (length - len(ids)) for ids in tokens]
    return torch.tensor(padded, dtype=torch.int64, device=device)


def condition_time_mask(
    features_lens: Tensor, mask_percent: tuple[float, float], max_len: int = 0
) -> Tensor:
    """A random contiguous span of mask_percent (e.g. 70-100 %) of each utterance: (B, T),
    True inside the span."""
    lens = features_lens
    mask_size = (torch.zeros_like(lens, dtype=torch.float32).uniform_(*mask_percent) * lens).to(
        torch.int64
    )
    mask_starts = (torch.rand_like(mask_size, dtype=torch.float32) * (lens - mask_size)).to(
        torch.int64
    )
    mask_ends = mask_starts + mask_size
    max_len = max(int(max_len), int(lens.max()))
    positions = torch.arange(max_len, device=lens.device).unsqueeze(0)
    return (positions >= mask_starts.unsqueeze(1)) & (positions < mask_ends.unsqueeze(1))


def get_tokens_index(features_lens: Tensor, tokens_lens: Tensor, num_frames: int) -> Tensor:
    """Token index for each frame when an utterance's F frames are spread over its N tokens:
    each token gets F // N frames and index N (a pad slot) takes the rest. (B, num_frames)."""
    per_token = (features_lens // tokens_lens).unsqueeze(1)  # (B, 1)
    frames = torch.arange(num_frames, device=features_lens.device).unsqueeze(0)
    n = tokens_lens.unsqueeze(1)
    index = torch.minimum(frames // per_token.clamp(min=1), n)
    return torch.where(per_token > 0, index, n)


class FlowMatchingOutputs(NamedTuple):
    """What one training forward computed: the loss, the predicted and target velocity
    (B, T, feat_dim), the frames the loss covers (the masked span, no padding) and padding."""

    loss: Tensor
    velocity: Tensor
    target: Tensor
    loss_mask: Tensor
    padding_mask: Tensor


class ZipVoice(nn.Module):
    """Text encoder + flow-matching decoder. Constructor arguments are the keys of
    ``model.json["model"]`` plus ``vocab_size`` and ``pad_id``."""

    def __init__(
        self,
        fm_decoder_downsampling_factor: Sequence[int] = (1, 2, 4, 2, 1),
        fm_decoder_num_layers: Sequence[int] = (2, 2, 4, 4, 4),
        fm_decoder_cnn_module_kernel: Sequence[int] = (31, 15, 7, 15, 31),
        fm_decoder_feedforward_dim: int = 1536,
        fm_decoder_num_heads: int = 4,
        fm_decoder_dim: int = 512,
        text_encoder_num_layers: int = 4,
        text_encoder_feedforward_dim: int = 512,
        text_encoder_cnn_module_kernel: int = 9,
        text_encoder_num_heads: int = 4,
        text_encoder_dim: int = 192,
        time_embed_dim: int = 192,
        text_embed_dim: int = 192,
        query_head_dim: int = 32,
        value_head_dim: int = 12,
        pos_head_dim: int = 4,
        pos_dim: int = 48,
        feat_dim: int = 100,
        vocab_size: int = 26,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.fm_decoder = self._build_fm_decoder(
            feat_dim=feat_dim,
            downsampling_factor=fm_decoder_downsampling_factor,
            num_layers=fm_decoder_num_layers,
            cnn_module_kernel=fm_decoder_cnn_module_kernel,
            dim=fm_decoder_dim,
            feedforward_dim=fm_decoder_feedforward_dim,
            num_heads=fm_decoder_num_heads,
            query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim,
            value_head_dim=value_head_dim,
            pos_dim=pos_dim,
            time_embed_dim=time_embed_dim,
        )
        self.text_encoder = TTSZipformer(
            in_dim=text_embed_dim,
            out_dim=feat_dim,
            downsampling_factor=1,
            num_encoder_layers=text_encoder_num_layers,
            cnn_module_kernel=text_encoder_cnn_module_kernel,
            encoder_dim=text_encoder_dim,
            feedforward_dim=text_encoder_feedforward_dim,
            num_heads=text_encoder_num_heads,
            query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim,
            value_head_dim=value_head_dim,
            pos_dim=pos_dim,
            use_time_embed=False,
        )
        self.feat_dim = feat_dim
        self.text_embed_dim = text_embed_dim
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, text_embed_dim)
        self.solver = self._build_solver()

    def _build_fm_decoder(
        self,
        feat_dim: int,
        downsampling_factor: Sequence[int],
        num_layers: Sequence[int],
        cnn_module_kernel: Sequence[int],
        dim: int,
        feedforward_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        value_head_dim: int,
        pos_dim: int,
        time_embed_dim: int,
    ) -> TTSZipformer:
        return TTSZipformer(
            in_dim=feat_dim * 3,
            out_dim=feat_dim,
            downsampling_factor=downsampling_factor,
            num_encoder_layers=num_layers,
            cnn_module_kernel=cnn_module_kernel,
            encoder_dim=dim,
            feedforward_dim=feedforward_dim,
            num_heads=num_heads,
            query_head_dim=query_head_dim,
            pos_head_dim=pos_head_dim,
            value_head_dim=value_head_dim,
            pos_dim=pos_dim,
            use_time_embed=True,
            time_embed_dim=time_embed_dim,
            use_guidance_scale_embed=self._uses_guidance_scale_embed,
        )

    _uses_guidance_scale_embed = False

    def _build_solver(self) -> EulerSolver:
        return EulerSolver(self, func_name="forward_fm_decoder")

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @staticmethod
    def _as_batch_vector(value: Tensor, batch_size: int) -> Tensor:
        """(B, 1, 1) -> (B,); a scalar is repeated over the batch."""
        while value.dim() > 1 and value.size(-1) == 1:
            value = value.squeeze(-1)
        if value.dim() == 0:
            value = value.repeat(batch_size)
        return value

    def forward_fm_decoder(
        self,
        t: Tensor,
        xt: Tensor,
        text_condition: Tensor,
        speech_condition: Tensor,
        padding_mask: Tensor | None = None,
        guidance_scale: Tensor | None = None,
    ) -> Tensor:
        """Velocity at time t. t (and guidance_scale): (B, 1, 1) or a scalar tensor;
        xt, text_condition, speech_condition: (B, T, feat_dim); padding_mask: (B, T)."""
        x = torch.cat([xt, text_condition, speech_condition], dim=2)
        if t.dim() not in (0, 3):
            raise ValueError(f"t must be a scalar or (B, 1, 1), got shape {tuple(t.shape)}")
        t = self._as_batch_vector(t, x.shape[0])
        if guidance_scale is not None:
            guidance_scale = self._as_batch_vector(guidance_scale, x.shape[0])
            return self.fm_decoder(
                x=x, t=t, padding_mask=padding_mask, guidance_scale=guidance_scale
            )
        return self.fm_decoder(x=x, t=t, padding_mask=padding_mask)

    def forward_text_embed(self, tokens: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Text-encoder output (B, S+1, feat_dim) and token counts (B,)."""
        device = self.device
        tokens_padded = pad_labels(tokens, pad_id=self.pad_id, device=device)
        embed = self.embed(tokens_padded)
        tokens_lens = torch.tensor([len(ids) for ids in tokens], dtype=torch.int64, device=device)
        tokens_padding_mask = make_pad_mask(tokens_lens, embed.shape[1])
        embed = self.text_encoder(x=embed, t=None, padding_mask=tokens_padding_mask)
        return embed, tokens_lens

    def forward_text_condition(
        self, embed: Tensor, tokens_lens: Tensor, features_lens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Frame-level text condition (B, T, C) by even token durations, and its padding
        mask (B, T)."""
        num_frames = int(features_lens.max())
        padding_mask = make_pad_mask(features_lens, max_len=num_frames)
        tokens_index = get_tokens_index(
            features_lens.to(embed.device), tokens_lens.to(embed.device), num_frames
        )
        text_condition = torch.gather(
            embed,
            dim=1,
            index=tokens_index.unsqueeze(-1).expand(embed.size(0), num_frames, embed.size(-1)),
        )
        return text_condition, padding_mask

    def forward_text_train(
        self, tokens: Sequence[Sequence[int]], features_lens: Tensor
    ) -> tuple[Tensor, Tensor]:
        embed, tokens_lens = self.forward_text_embed(tokens)
        return self.forward_text_condition(embed, tokens_lens, features_lens)

    def forward_text_inference_gt_duration(
        self,
        tokens: Sequence[Sequence[int]],
        features_lens: Tensor,
        prompt_tokens: Sequence[Sequence[int]],
        prompt_features_lens: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Condition for prompt + text when the text's frame count is given."""
        cat_tokens = [list(p) + list(t) for p, t in zip(prompt_tokens, tokens, strict=True)]
        embed, tokens_lens = self.forward_text_embed(cat_tokens)
        return self.forward_text_condition(embed, tokens_lens, prompt_features_lens + features_lens)

    def forward_text_inference_ratio_duration(
        self,
        tokens: Sequence[Sequence[int]],
        prompt_tokens: Sequence[Sequence[int]],
        prompt_features_lens: Tensor,
        speed: float,
    ) -> tuple[Tensor, Tensor]:
        """Condition for prompt + text, the text's length predicted from the prompt's
        frames-per-token ratio: prompt_len + ceil(prompt_len / prompt_tokens * tokens / speed)."""
        device = self.device
        cat_tokens = [list(p) + list(t) for p, t in zip(prompt_tokens, tokens, strict=True)]
        prompt_tokens_lens = torch.tensor(
            [len(p) for p in prompt_tokens], dtype=torch.int64, device=device
        )
        tokens_lens = torch.tensor([len(t) for t in tokens], dtype=torch.int64, device=device)
        cat_embed, cat_tokens_lens = self.forward_text_embed(cat_tokens)
        prompt_features_lens = prompt_features_lens.to(device)
        features_lens = prompt_features_lens + torch.ceil(
            prompt_features_lens / prompt_tokens_lens * tokens_lens / speed
        ).to(dtype=torch.int64)
        return self.forward_text_condition(cat_embed, cat_tokens_lens, features_lens)

    def forward(
        self,
        tokens: Sequence[Sequence[int]],
        features: Tensor,
        features_lens: Tensor,
        noise: Tensor,
        t: Tensor,
        condition_drop_ratio: float = 0.0,
        return_outputs: bool = False,
    ) -> Tensor | FlowMatchingOutputs:
        """Flow-matching loss. features, noise: (B, T, feat_dim); t: (B, 1, 1).

        The speech condition is the features with a random 70-100 % span zeroed; the loss is
        the MSE of the velocity over that span only, excluding padding. `return_outputs` gives
        the velocity, target and masks too (per-cut losses and distillation need them; it goes
        through `forward` so that DDP sees the call).
        """
        text_condition, padding_mask = self.forward_text_train(tokens, features_lens)
        speech_condition_mask = condition_time_mask(
            features_lens=features_lens, mask_percent=(0.7, 1.0), max_len=features.size(1)
        )
        speech_condition = torch.where(speech_condition_mask.unsqueeze(-1), 0, features)
        if condition_drop_ratio > 0.0:
            keep = torch.rand(text_condition.size(0), 1, 1, device=text_condition.device)
            text_condition = text_condition * (keep > condition_drop_ratio)
        xt = features * t + noise * (1 - t)
        ut = features - noise
        vt = self.forward_fm_decoder(
            t=t,
            xt=xt,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
        )
        loss_mask = speech_condition_mask & (~padding_mask)
        loss = torch.mean((vt[loss_mask] - ut[loss_mask]) ** 2)
        if return_outputs:
            return FlowMatchingOutputs(loss, vt, ut, loss_mask, padding_mask)
        return loss

    def sample(
        self,
        tokens: Sequence[Sequence[int]],
        prompt_tokens: Sequence[Sequence[int]],
        prompt_features: Tensor,
        prompt_features_lens: Tensor,
        features_lens: Tensor | None = None,
        speed: float = 1.0,
        t_shift: float = 1.0,
        duration: str = "predict",
        num_step: int = 5,
        guidance_scale: float = 0.5,
        x0: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Generate features for ``tokens`` in the voice of the prompt.

        duration "predict" takes lengths from the prompt's frames-per-token ratio (and
        ``speed``); "real" uses ``features_lens``. ``x0`` overrides the initial noise.
        Returns (features without prompt (B, T', F), their lengths, the prompt part, prompt
        lengths).
        """
        if duration not in ("real", "predict"):
            raise ValueError(f'duration must be "real" or "predict", got {duration!r}')
        if duration == "predict":
            text_condition, padding_mask = self.forward_text_inference_ratio_duration(
                tokens=tokens,
                prompt_tokens=prompt_tokens,
                prompt_features_lens=prompt_features_lens,
                speed=speed,
            )
        else:
            if features_lens is None:
                raise ValueError('duration="real" needs features_lens')
            text_condition, padding_mask = self.forward_text_inference_gt_duration(
                tokens=tokens,
                features_lens=features_lens,
                prompt_tokens=prompt_tokens,
                prompt_features_lens=prompt_features_lens,
            )
        batch_size, num_frames, _ = text_condition.shape
        prompt_features_lens = prompt_features_lens.to(text_condition.device)
        speech_condition = nn.functional.pad(
            prompt_features, (0, 0, 0, num_frames - prompt_features.size(1))
        )
        speech_condition_mask = make_pad_mask(prompt_features_lens, num_frames)
        speech_condition = torch.where(
            speech_condition_mask.unsqueeze(-1),
            torch.zeros_like(speech_condition),
            speech_condition,
        )
        if x0 is None:
            x0 = torch.randn(
                batch_size, num_frames, prompt_features.size(-1), device=text_condition.device
            )
        x1 = self.solver.sample(
            x=x0,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
            num_step=num_step,
            guidance_scale=guidance_scale,
            t_shift=t_shift,
        )
        x1_wo_prompt_lens = (~padding_mask).sum(-1) - prompt_features_lens
        x1_prompt = x1.new_zeros(x1.size(0), int(prompt_features_lens.max()), x1.size(2))
        x1_wo_prompt = x1.new_zeros(x1.size(0), int(x1_wo_prompt_lens.max()), x1.size(2))
        for i in range(x1.size(0)):
            start = int(prompt_features_lens[i])
            length = int(x1_wo_prompt_lens[i])
            x1_wo_prompt[i, :length] = x1[i, start : start + length]
            x1_prompt[i, :start] = x1[i, :start]
        return x1_wo_prompt, x1_wo_prompt_lens, x1_prompt, prompt_features_lens

    def sample_intermediate(
        self,
        tokens: Sequence[Sequence[int]],
        features: Tensor,
        features_lens: Tensor,
        noise: Tensor,
        speech_condition_mask: Tensor,
        t_start: float,
        t_end: float,
        num_step: int = 1,
        guidance_scale: Tensor | float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Integrate from ``noise`` at t_start to t_end (used to train the distilled model).
        speech_condition_mask: (B, T), True where the features are hidden."""
        text_condition, padding_mask = self.forward_text_train(tokens, features_lens)
        speech_condition = torch.where(speech_condition_mask.unsqueeze(-1), 0, features)
        x_t_end = self.solver.sample(
            x=noise,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
            num_step=num_step,
            guidance_scale=0.0 if guidance_scale is None else guidance_scale,
            t_start=t_start,
            t_end=t_end,
        )
        return x_t_end, (~padding_mask).sum(-1)
