"""Triton kernels for the dynamic memory, one file per op (kernels, launchers, torch op).

Installed as ``dmgan.kernels`` (``dmgan/kernels`` links to this folder), never as a top-level
``kernels`` package, which would collide with another project's of that name. The kernels import
torch, triton and :mod:`dmgan.ops.library` (the op's shared facts), never the model; ``dmgan.ops``
calls into them through ``dmgan.kernels.backend``.
"""
