"""Stage I, the warm-up stage: what it refuses before any training job starts."""

import pytest

from gs_ray.config import load_config
from gs_ray.core.errors import ModelError
from gs_ray.stages.pipeline import run_stages

from conftest import WARM_RUN_OVERRIDES


def test_embedding_lora_stops_the_warmup_on_the_driver_naming_the_module(tiny_warm_run, monkeypatch):
    """PEFT's lora_embedding_A/B would be left out of every Stage II gradient: refused before any Train job."""
    from gs_ray.stages import warmup

    def no_training(*args, **kwargs):
        raise AssertionError("a training job started")

    monkeypatch.setattr(warmup, "run_training", no_training)
    cfg = load_config("tiny", [f"run.run_dir={tiny_warm_run('embedding-lora')}", *WARM_RUN_OVERRIDES,
                               "lora.target_modules=[q_proj,embed_tokens]"])
    with pytest.raises(ModelError, match="lora.target_modules: 'embed_tokens' adapts model.embed_tokens"):
        run_stages(cfg, "warmup")
