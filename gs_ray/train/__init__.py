"""Training: the one Ray Train + DeepSpeed loop (warm-up, experts, baselines) and the encoder router."""
