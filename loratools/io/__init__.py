"""Bytes ↔ tensors. Nothing in here knows about Stable Diffusion."""
