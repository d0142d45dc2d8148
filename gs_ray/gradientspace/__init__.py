"""GradientSpace itself: exact per-sample LoRA gradients, the clustering math and actor, and the gradient stream."""
