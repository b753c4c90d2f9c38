"""Predicted listening quality (MOS) of generated audio."""
