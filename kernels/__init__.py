"""Triton kernels, one file per kernel family, each beside its torch twin (imported as nanodp.kernels)."""
