"""ZipVoice on ONNX Runtime, written against upstream's ONNX contract (see onnx/export.py).

It runs this project's exports and upstream's published ONNX models alike: the text encoder
gives the frame-level text condition (prompt region included), and the decoder graph returns
the guided velocity (classifier-free guidance is inside it), so sampling here is plain Euler
over time points shifted by s*t / (1 + (s-1)*t), from Gaussian noise of the text condition's
shape, with the prompt's features at the start of the speech condition; the generated speech
is the frames after the prompt. The graphs take no padding mask, so each text of a batch is
sampled on its own (batching padded chunks into one call saved 2 % on the CPU, see
docs/benchmarks.md).

Time-gated adapters: an export with `fm_decoder_base.onnx` runs it on the steps whose start
time t (after the shift) falls outside the adapter's range [A, B), `fm_decoder.onnx` inside.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zipvoice.models.modules.time_gate import check_t_range, in_t_range, parse_t_range
from zipvoice.onnx.export import (
    FM_DECODER_BASE_FILE,
    FM_DECODER_FILE,
    FM_DECODER_INPUTS,
    TEXT_ENCODER_FILE,
    TEXT_ENCODER_INPUTS,
    TOKENS_FILE,
    VOCODER_FILE,
    int8_name,
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


def _check_inputs(session: ort.InferenceSession, path: Path, expected: tuple[str, ...]) -> None:
    names = tuple(i.name for i in session.get_inputs())
    if names != expected:
        older = " (an export of an older version of this toolkit: export it again)"
        hint = older if "padding_mask" in names else ""
        raise OnnxModelError(
            f"{path} has inputs {list(names)}, not the ZipVoice contract's {list(expected)}{hint}"
        )


class OnnxZipVoice:
    """An ONNX model folder: text_encoder[_int8].onnx, fm_decoder[_int8].onnx, tokens.txt
    (upstream's), optionally fm_decoder_base[_int8].onnx (time gating) and vocoder.onnx.

    `model_name` is the model type when the files do not say it (upstream's exports carry no
    model_type; it only picks the default steps and guidance scale). `lora_t_range` overrides
    the range an export recorded; it needs fm_decoder_base.onnx.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        int8: bool = False,
        num_thread: int = 1,
        model_name: str = "zipvoice",
        lora_t_range: tuple[float, float] | None = None,
    ):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"ONNX model folder {self.model_dir} not found")
        name = int8_name if int8 else str
        names = (name(TEXT_ENCODER_FILE), name(FM_DECODER_FILE), TOKENS_FILE)
        for file in names:
            if not (self.model_dir / file).is_file():
                hint = " (export with --int8 1)" if int8 and file.endswith(".onnx") else ""
                raise FileNotFoundError(f"ONNX model folder {self.model_dir} lacks {file}{hint}")
        verify_folder(self.model_dir)  # one export only: no swapped, stray or damaged file
        self.text_encoder = _session(self.model_dir / names[0], num_thread)
        _check_inputs(self.text_encoder, self.model_dir / names[0], TEXT_ENCODER_INPUTS)
        self.fm_decoder = _session(self.model_dir / names[1], num_thread)
        _check_inputs(self.fm_decoder, self.model_dir / names[1], FM_DECODER_INPUTS)
        self.token_file = self.model_dir / TOKENS_FILE
        self.metadata = dict(self.fm_decoder.get_modelmeta().custom_metadata_map)
        if "feat_dim" not in self.metadata:
            raise OnnxModelError(f"{self.model_dir / names[1]} has no feat_dim metadata")
        self.model_type = self.metadata.get("model_type", model_name)
        self.distill = self.model_type == "zipvoice_distill"
        self.feat_dim = int(self.metadata["feat_dim"])
        self.fm_decoder_base, self.t_range = self._time_gate(name, num_thread, lora_t_range)
        vocoder_path = self.model_dir / VOCODER_FILE
        self.vocoder = _session(vocoder_path, num_thread) if vocoder_path.is_file() else None

    def _time_gate(
        self, name: Callable[[str], str], num_thread: int, t_range: tuple[float, float] | None
    ) -> tuple[ort.InferenceSession | None, tuple[float, float] | None]:
        """The base decoder and the range of a time-gated export (None, None otherwise)."""
        path = self.model_dir / name(FM_DECODER_BASE_FILE)
        recorded = self.metadata.get("lora_t_range")
        if t_range is None and recorded is None:
            return None, None
        if not path.is_file():
            raise OnnxModelError(
                f"--lora-t-range needs {path.name} in {self.model_dir} "
                "(export with --lora-path and --lora-t-range)"
            )
        session = _session(path, num_thread)
        _check_inputs(session, path, FM_DECODER_INPUTS)
        t_range = check_t_range(t_range) if t_range is not None else parse_t_range(recorded)
        return session, t_range

    def decoder_for(self, t: float) -> ort.InferenceSession:
        """The decoder a step starting at flow time t runs (time gating, else the only one)."""
        if self.t_range is None or in_t_range(t, self.t_range):
            return self.fm_decoder
        return self.fm_decoder_base

    def text_condition(
        self, tokens: list[int], prompt_tokens: list[int], prompt_features_len: int, speed: float
    ) -> np.ndarray:
        """(1, F, feat_dim) for one text with its prompt, prompt frames included."""
        (condition,) = self.text_encoder.run(
            None,
            {
                "tokens": np.asarray([tokens], dtype=np.int64),
                "prompt_tokens": np.asarray([prompt_tokens], dtype=np.int64),
                "prompt_features_len": np.asarray(prompt_features_len, dtype=np.int64),
                "speed": np.asarray(speed, dtype=np.float32),
            },
        )
        return condition

    def velocity(
        self,
        t: float,
        x: np.ndarray,
        text_condition: np.ndarray,
        speech_condition: np.ndarray,
        guidance_scale: float,
    ) -> np.ndarray:
        """The guided velocity (N, F, feat_dim) at flow time t, from the decoder for t."""
        feeds = {
            "t": np.asarray(t, dtype=np.float32),
            "x": x.astype(np.float32),
            "text_condition": text_condition.astype(np.float32),
            "speech_condition": speech_condition.astype(np.float32),
            "guidance_scale": np.asarray(guidance_scale, dtype=np.float32),
        }
        return self.decoder_for(t).run(None, feeds)[0]

    def sample_one(
        self,
        tokens: list[int],
        prompt_tokens: list[int],
        prompt_features: np.ndarray,
        num_step: int,
        guidance_scale: float,
        t_shift: float = 0.5,
        speed: float = 1.0,
        rng: np.random.Generator | None = None,
        x0: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features (feat_dim, T) after the prompt for one text (prompt_features: (P, feat_dim),
        already multiplied by feat_scale). `x0` (1, F, feat_dim) replaces the noise."""
        if num_step < 1:
            raise ValueError(f"num_step must be >= 1, got {num_step}")
        prompt_len = prompt_features.shape[0]
        text_condition = self.text_condition(tokens, prompt_tokens, prompt_len, speed)
        if x0 is None:
            rng = rng if rng is not None else np.random.default_rng()
            x0 = rng.standard_normal(text_condition.shape)
        x = x0.astype(np.float32)
        if x.shape != text_condition.shape:
            raise ValueError(f"x0 has shape {x.shape}, the text condition {text_condition.shape}")
        speech_condition = np.zeros_like(text_condition)
        kept = min(prompt_len, speech_condition.shape[1])
        speech_condition[0, :kept] = prompt_features[:kept]
        steps = time_steps(num_step, t_shift)
        for k in range(num_step):
            v = self.velocity(float(steps[k]), x, text_condition, speech_condition, guidance_scale)
            x = x + v * (steps[k + 1] - steps[k])
        return x[0, prompt_len:].T.copy()

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
    ) -> list[np.ndarray]:
        """`sample_one` for each text of the batch, in order, drawing noise from `rng`."""
        rng = rng if rng is not None else np.random.default_rng()
        return [
            self.sample_one(
                ids, prompt_tokens, prompt_features, num_step, guidance_scale, t_shift, speed, rng
            )
            for ids in batch
        ]

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
