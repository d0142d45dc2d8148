"""gs_ray: GradientSpace instruction tuning on Ray.

Cluster training samples by their full LoRA gradients, train one LoRA expert per
cluster, and serve them behind a router that sends each request to one expert.
"""

__version__ = "0.1.0"
