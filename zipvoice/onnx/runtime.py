"""ZipVoice on ONNX Runtime: the exported text encoder and decoder, sampled in numpy.

Sampling follows the reference: Euler steps over time points shifted by s*t / (1 + (s-1)*t);
for ZipVoice, classifier-free guidance runs the batch twice (text condition zeroed in the
unconditional half, which for t > 0.5 also loses the speech condition; for t <= 0.5 the
scale is doubled): v = (1+g)*v_cond - g*v_uncond. ZipVoice-Distill takes g as an input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zipvoice.onnx.export import (
    FM_DECODER_FILE,
    TEXT_ENCODER_FILE,
    TOKENS_FILE,
    VOCODER_FILE,
)
from zipvoice.utils.manifest import verify_folder


class OnnxModelError(ValueError):
    """An ONNX model folder that is incomplete or not a ZipVoice export."""


def time_steps(num_step: int, t_shift: float) -> np.ndarray:
    t = np.linspace(0.0, 1.0, num_step + 1, dtype=np.float32)
    return (t_shift * t / (1.0 + (t_shift - 1.0) * t)).astype(np.float32)


def _session(path: Path, num_thread: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_thread
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types; any means an unusable file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OnnxModelError(f"{path} is not a readable ONNX model: {reason}") from err


class OnnxZipVoice:
    """The exported model folder (text_encoder[_int8].onnx, fm_decoder[_int8].onnx,
    tokens.txt, optionally vocoder.onnx)."""

    def __init__(self, model_dir: str | os.PathLike, int8: bool = False, num_thread: int = 1):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"ONNX model folder {self.model_dir} not found")
        suffix = "_int8.onnx" if int8 else ".onnx"
        names = (
            TEXT_ENCODER_FILE.replace(".onnx", suffix),
            FM_DECODER_FILE.replace(".onnx", suffix),
            TOKENS_FILE,
        )
        for name in names:
            if not (self.model_dir / name).is_file():
                hint = " (export with --int8 1)" if int8 and name.endswith(".onnx") else ""
                raise FileNotFoundError(f"ONNX model folder {self.model_dir} lacks {name}{hint}")
        verify_folder(self.model_dir)  # one export only: no swapped, stray or damaged file
        self.text_encoder = _session(self.model_dir / names[0], num_thread)
        self.fm_decoder = _session(self.model_dir / names[1], num_thread)
        self.token_file = self.model_dir / TOKENS_FILE
        self.metadata = dict(self.fm_decoder.get_modelmeta().custom_metadata_map)
        if "model_type" not in self.metadata:
            raise OnnxModelError(f"{self.model_dir / names[1]} has no ZipVoice metadata")
        self.model_type = self.metadata["model_type"]
        self.distill = self.model_type == "zipvoice_distill"
        self.feat_dim = int(self.metadata["feat_dim"])
        decoder_inputs = {i.name for i in self.fm_decoder.get_inputs()}
        if self.distill != ("guidance_scale" in decoder_inputs):
            raise OnnxModelError(f"{self.model_dir}: decoder inputs do not fit {self.model_type}")
        vocoder_path = self.model_dir / VOCODER_FILE
        self.vocoder = _session(vocoder_path, num_thread) if vocoder_path.is_file() else None

    def text_condition(
        self, tokens: list[int], prompt_tokens: list[int], prompt_features_len: int, speed: float
    ) -> np.ndarray:
        """(T, feat_dim) for one text with its prompt."""
        (condition,) = self.text_encoder.run(
            None,
            {
                "tokens": np.asarray([tokens], dtype=np.int64),
                "prompt_tokens": np.asarray([prompt_tokens], dtype=np.int64),
                "prompt_features_len": np.asarray(prompt_features_len, dtype=np.int64),
                "speed": np.asarray(speed, dtype=np.float32),
            },
        )
        return condition[0]

    def velocity(
        self,
        t: np.ndarray,
        x: np.ndarray,
        text_condition: np.ndarray,
        speech_condition: np.ndarray,
        padding_mask: np.ndarray,
        guidance_scale: np.ndarray | None = None,
    ) -> np.ndarray:
        feeds = {
            "t": t.astype(np.float32),
            "x": x.astype(np.float32),
            "text_condition": text_condition.astype(np.float32),
            "speech_condition": speech_condition.astype(np.float32),
            "padding_mask": padding_mask.astype(bool),
        }
        if guidance_scale is not None:
            feeds["guidance_scale"] = guidance_scale.astype(np.float32)
        return self.fm_decoder.run(None, feeds)[0]

    def guided_velocity(
        self,
        t: float,
        x: np.ndarray,
        text_condition: np.ndarray,
        speech_condition: np.ndarray,
        padding_mask: np.ndarray,
        guidance_scale: float,
    ) -> np.ndarray:
        n = x.shape[0]
        if self.distill:
            return self.velocity(
                np.full(n, t, np.float32),
                x,
                text_condition,
                speech_condition,
                padding_mask,
                np.full(n, guidance_scale, np.float32),
            )
        t_batch = np.full(n, t, np.float32)
        if guidance_scale == 0.0:
            return self.velocity(t_batch, x, text_condition, speech_condition, padding_mask)
        if t > 0.5:
            uncond_speech = np.zeros_like(speech_condition)
        else:
            uncond_speech = speech_condition
            guidance_scale = guidance_scale * 2.0
        v = self.velocity(
            np.concatenate([t_batch, t_batch]),
            np.concatenate([x, x]),
            np.concatenate([np.zeros_like(text_condition), text_condition]),
            np.concatenate([uncond_speech, speech_condition]),
            np.concatenate([padding_mask, padding_mask]),
        )
        v_uncond, v_cond = v[:n], v[n:]
        return (1.0 + guidance_scale) * v_cond - guidance_scale * v_uncond

    def sample(
        self,
        batch: list[list[int]],
        prompt_tokens: list[int],
        prompt_features: np.ndarray,
        num_step: int,
        guidance_scale: float,
        t_shift: float = 0.5,
        speed: float = 1.0,
        rng: np.random.Generator | None = None,
        x0: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Features (feat_dim, T_i) after the prompt for each text of the batch."""
        if num_step < 1:
            raise ValueError(f"num_step must be >= 1, got {num_step}")
        rng = rng if rng is not None else np.random.default_rng()
        prompt_len = prompt_features.shape[0]
        conditions = [self.text_condition(ids, prompt_tokens, prompt_len, speed) for ids in batch]
        lengths = [c.shape[0] for c in conditions]
        n, frames = len(batch), max(lengths)
        # Padded frames repeat the last one (the pad slot), as the PyTorch gather does.
        text_condition = np.stack(
            [np.pad(c, ((0, frames - c.shape[0]), (0, 0)), mode="edge") for c in conditions]
        )
        padding_mask = np.arange(frames)[None, :] >= np.asarray(lengths)[:, None]
        speech_condition = np.zeros((n, frames, self.feat_dim), np.float32)
        speech_condition[:, :prompt_len] = prompt_features
        x = (
            x0.astype(np.float32)
            if x0 is not None
            else rng.standard_normal((n, frames, self.feat_dim)).astype(np.float32)
        )
        steps = time_steps(num_step, t_shift)
        for k in range(num_step):
            v = self.guided_velocity(
                float(steps[k]), x, text_condition, speech_condition, padding_mask, guidance_scale
            )
            x = x + v * (steps[k + 1] - steps[k])
        return [x[i, prompt_len : lengths[i]].T.copy() for i in range(n)]

    def sampler(
        self,
        num_step: int,
        guidance_scale: float,
        t_shift: float = 0.5,
        speed: float = 1.0,
        seed: int = 0,
    ) -> Callable[[list[list[int]], list[int], np.ndarray], list[np.ndarray]]:
        """`sample` with fixed settings and a seeded generator: the generation pipeline's
        SampleFn (zipvoice.inference.generation)."""
        rng = np.random.default_rng(seed)

        def sample(batch: list[list[int]], prompt_ids: list[int], prompt_features: np.ndarray):
            return self.sample(
                batch,
                prompt_ids,
                prompt_features,
                num_step=num_step,
                guidance_scale=guidance_scale,
                t_shift=t_shift,
                speed=speed,
                rng=rng,
            )

        return sample

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        if self.vocoder is None:
            raise OnnxModelError(f"{self.model_dir} has no {VOCODER_FILE}")
        (wave,) = self.vocoder.run(None, {"mel": mel[None].astype(np.float32)})
        return wave[0]
