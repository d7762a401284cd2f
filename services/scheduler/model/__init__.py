"""The model package: config, KV pool, forward batch, attention backend, layers, models, loader."""

from services.scheduler.model.batch import ForwardBatch, build_forward_batch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.model.loader import load_model
from services.scheduler.model.registry import get_model_class, supported_architectures

__all__ = [
    "ForwardBatch",
    "KVPool",
    "ModelConfig",
    "build_forward_batch",
    "get_model_class",
    "load_model",
    "supported_architectures",
]
