"""Latency: targets, on-device timing, layer configurations, tables, the predictor, validation."""
from __future__ import annotations

from hwprune.latency.layers import LayerConfig, ModelLayers, analyze_layers
from hwprune.latency.predictor import Prediction, Predictor, fit_linear, model_key
from hwprune.latency.ondemand import ProfileJob, find_table, resolve_table
from hwprune.latency.table import Entry, LatencyTable, table_path, table_dirs, user_tables_dir
from hwprune.device.targets import TARGETS, Target, get_target

__all__ = ["LayerConfig", "ModelLayers", "analyze_layers", "Prediction", "Predictor", "fit_linear", "model_key",
           "Entry", "LatencyTable", "find_table", "resolve_table", "ProfileJob", "table_path", "table_dirs",
           "user_tables_dir", "TARGETS", "Target", "get_target"]
