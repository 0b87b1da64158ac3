"""DPO training: config setup, the trainer, checkpoints and the training report."""
