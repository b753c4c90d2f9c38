"""Speaker similarity between generated audio and its prompt (SIM-o)."""
