"""Saving tiny transformers WavLM / wav2vec 2.0 models in the original (fairseq/unilm)
parameter naming that upstream's evaluation checkpoints use. The renaming is written out here
independently of the loader's own table, so a wrong rule in either shows up as a test failure."""

from __future__ import annotations

HF_TO_ORIGINAL = [
    ("masked_spec_embed", "mask_emb"),
    (".conv.", ".0."),
    ("feature_projection.layer_norm.", "layer_norm."),
    ("feature_projection.projection.", "post_extract_proj."),
    ("pos_conv_embed.0.parametrizations.weight.original0", "pos_conv.0.weight_g"),
    ("pos_conv_embed.0.parametrizations.weight.original1", "pos_conv.0.weight_v"),
    ("pos_conv_embed.0.", "pos_conv.0."),
    (".attention.gru_rel_pos_linear.", ".self_attn.grep_linear."),
    (".attention.gru_rel_pos_const", ".self_attn.grep_a"),
    (".attention.rel_attn_embed.", ".self_attn.relative_attention_bias."),
    (".attention.", ".self_attn."),
    (".feed_forward.intermediate_dense.", ".fc1."),
    (".feed_forward.output_dense.", ".fc2."),
]


def to_original_name(hf_key: str, group_norm: bool = False) -> str:
    """transformers name -> original name. Feature-extractor norms sit at `.2.1.` (layer norm,
    large models) or `.2.` (group norm of the first conv, base models); an encoder layer's
    pre-attention norm is `self_attn_layer_norm`."""
    key = hf_key
    for old, new in HF_TO_ORIGINAL:
        key = key.replace(old, new)
    parts = key.split(".")
    if parts[:2] == ["feature_extractor", "conv_layers"] and parts[3] == "layer_norm":
        parts[3:4] = ["2"] if group_norm else ["2", "1"]
    if parts[:2] == ["encoder", "layers"] and parts[3] == "layer_norm":
        parts[3] = "self_attn_layer_norm"
    return ".".join(parts)
