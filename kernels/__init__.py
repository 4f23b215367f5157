"""Backends of the A3 AFD op family: `reference` (pure torch, any CPU) and `npu` (torch_npu)."""
