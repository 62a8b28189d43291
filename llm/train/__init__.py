"""Training: the Trainer subclass, metrics, callbacks, checkpoints and the fine-tuning workflow."""
