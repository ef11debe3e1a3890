"""Triton kernels (installed as dive.kernels). Import needs triton; dive.ops imports lazily."""
