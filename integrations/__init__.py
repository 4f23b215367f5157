"""Integrations of afd-dispatch with serving stacks (vLLM plugin, Ray FFN workers)."""
