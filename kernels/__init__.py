"""Triton multi-tensor kernels, installed as ``fastasam.kernels`` (never as a top-level ``kernels`` package)."""
