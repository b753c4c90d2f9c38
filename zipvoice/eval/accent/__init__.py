"""Pitch-accent scores for generated Japanese speech.

`f0` extracts F0 (pyworld Harvest by default; see docs/evaluation-accent.md for the tracker
comparison), `align` DTW-aligns two utterances on spectral (pitch-free) features, `f0_match`
compares generated F0 with a same-text reference recording (log-F0 correlation, RMSE in cents,
voiced/unvoiced error), and `probe` checks minimal pairs such as 箸/橋/端 against OpenJTalk's
accent of each reading."""
