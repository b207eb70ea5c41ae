"""Triton kernels for the dynamic memory, one file per op family.

This package imports torch and triton, never ``dmgan``: ``dmgan.ops`` calls into it.
"""
