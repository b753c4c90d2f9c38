"""Objective scores on generated audio (speaker similarity, pitch accent, intelligibility,
quality), laid out like upstream ZipVoice's `zipvoice/eval/`: one sub-package per area, each
metric runnable as `python -m zipvoice.eval.<area>.<metric> --wav-path DIR --test-list TSV`.
Shared plumbing (test lists, audio loading, summaries, the command line) is in `utils`."""
