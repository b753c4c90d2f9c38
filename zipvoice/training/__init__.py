"""Training as a library: `TrainingConfig` (config.py) filled by the CLI or built in code, and
`Trainer` (trainer.py) with its named steps; model set-up, optimiser, loss steps, checkpoints,
distributed set-up, logging and callbacks each in their own module."""
