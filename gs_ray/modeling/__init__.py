"""Base models and LoRA adapters, token losses, and decoding."""
