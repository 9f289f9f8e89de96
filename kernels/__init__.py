"""Triton kernels and their plain-PyTorch references."""
