"""Fused CUDA kernels, their launchers and numpy references."""
