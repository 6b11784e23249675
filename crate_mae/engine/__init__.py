"""The training engine shared by pretraining, probing and fine-tuning: ranks, step, optimiser, checkpoints, logs."""
