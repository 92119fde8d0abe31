"""Search: specs, budgets, the Optuna controller and the run directory."""
from __future__ import annotations

from hwprune.search.budget import parse_budget
from hwprune.search.controller import load_front, run_search
from hwprune.search.spec import SearchSpec, load_spec

__all__ = ["parse_budget", "SearchSpec", "load_spec", "run_search", "load_front"]
