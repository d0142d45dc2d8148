"""The lowest layer: errors, storage, the run directory and its manifests, and every artifact name (layout)."""
