"""Triton kernels for the dynamic memory, one file per op family (kernels, launchers, torch op).

This package imports torch and triton, never ``dmgan``: ``dmgan.ops`` calls into it through
``kernels.backend``.
"""
