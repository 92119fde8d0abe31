"""Adapters around deprecated or moving third-party APIs, one module each."""
