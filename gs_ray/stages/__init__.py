"""The pipeline's stages, one module each (data, warmup, cluster, experts, router), and `pipeline` to run them."""
