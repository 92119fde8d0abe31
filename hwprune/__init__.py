"""hwprune: hardware-aware pruning and quantization search for PyTorch.

The flow of the command line as functions: ``from hwprune import api``; ``api.profile``, ``api.search``,
``api.export`` (:mod:`hwprune.api`; not re-exported here: ``hwprune.search`` and ``hwprune.export`` are modules).
Stages: :mod:`hwprune.space` (what can be pruned/quantized), :mod:`hwprune.policy`
(what to do, as versioned JSON), :mod:`hwprune.apply` (do it: a physically
smaller model), :mod:`hwprune.measure` (FLOPs/params), :mod:`hwprune.train`.
"""
from __future__ import annotations

from hwprune.apply import apply_policy, load_pruned, prune_model, save_pruned
from hwprune.device.deploy import deploy_cpu
from hwprune.data import DataBundle, load_data
from hwprune.errors import HwpruneError
from hwprune.measure import count_flops, model_stats
from hwprune.models import build_model
from hwprune.policy import FORMATS, Policy, keep_units, load_policy, save_policy, uniform_policy
from hwprune.space import PrunableGroup, QuantLayer, Space, build_space, prepare_model

__version__ = "0.1.0"

__all__ = [
    "HwpruneError", "build_model", "load_data", "DataBundle", "build_space", "prepare_model", "Space",
    "PrunableGroup", "QuantLayer", "Policy", "FORMATS", "keep_units", "uniform_policy", "load_policy",
    "save_policy", "apply_policy", "prune_model", "deploy_cpu", "save_pruned", "load_pruned", "count_flops",
    "model_stats", "__version__",
]
