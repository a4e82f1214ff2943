"""Policy names -> classes. An unknown name is an InputError that lists the valid ones."""
from __future__ import annotations

from kvtier.errors import InputError

DEFAULT_POLICY = "kvtier"

# name -> (module, class); imported on use
_POLICIES = {
    "kvtier": ("kvtier.policy.kvtier_policy", "KvtierPolicy"),
    "kvtier-density": ("kvtier.policy.kvtier_policy", "HitDensityPolicy"),  # the default's learned expert
    "kvtier-predict": ("kvtier.policy.predictor", "ReusePredictorPolicy"),  # the default's reuse predictor
    "lru": ("kvtier.policy.baselines", "LRU"),
    "lfu": ("kvtier.policy.baselines", "LFU"),
    "fifo": ("kvtier.policy.baselines", "FIFO"),
    "arc": ("kvtier.policy.baselines", "ARC"),
    "s3fifo": ("kvtier.policy.baselines", "S3FIFO"),
    "opt": ("kvtier.policy.opt", "OPT"),
}


def policy_names() -> list[str]:
    return list(_POLICIES)


def policy_class(name: str):
    import importlib

    if name not in _POLICIES:
        raise InputError(f"unknown policy '{name}'; valid: {', '.join(policy_names())}")
    module, attr = _POLICIES[name]
    return getattr(importlib.import_module(module), attr)


def make_policy(name: str, capacity_blocks: int, requests=None, **options):
    """A fresh policy instance; `requests` (the whole trace) is passed only to offline policies."""
    cls = policy_class(name)
    if cls.offline:
        return cls(capacity_blocks, requests=requests, **options)
    return cls(capacity_blocks, **options)
