"""Training and evaluation: Lightning tasks, datamodules and data formats, metrics, Hydra entry points."""
