"""Intelligibility: CER (Japanese, kana-normalised) and WER (English) of an ASR transcript of
the generated audio against the text it should say. `normalize` holds the text rules,
`whisper` the recogniser (Whisper through transformers) and its command line, `cer` the scorer
names `zipvoice.eval.registry` uses."""
