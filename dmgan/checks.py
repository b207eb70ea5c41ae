"""Input validation that names the argument and the shape it expected.

>>> import torch
>>> check = ShapeChecker("memory_read")
>>> check("img", torch.zeros(2, 8, 4, 4), ("B", "N_r", "H", "W"))
>>> check("keys", torch.zeros(3, 8, 5), ("B", "N_r", "T"))
Traceback (most recent call last):
...
ValueError: memory_read: keys must have shape (B, N_r, T) = (2, 8, T), got (3, 8, 5)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Dim = int | str


class ShapeChecker:
    """Checks tensors one by one, binding named dimensions on first sight.

    Every tensor must be on the device of the first; floating tensors must share one dtype unless
    autocast is on for that device (then mixed inputs are expected).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.dims: dict[str, int] = {}
        self.device: torch.device | None = None
        self.float_dtype: torch.dtype | None = None
        self._first_float: str | None = None

    def _fail(self, error: type[Exception], message: str) -> None:
        raise error(f"{self.where}: {message}")

    def _describe(self, spec: Sequence[Dim]) -> str:
        names = ", ".join(str(d) for d in spec)
        if all(isinstance(d, int) for d in spec):
            return f"({names})"
        bound = ", ".join(str(self.dims.get(d, d)) if isinstance(d, str) else str(d) for d in spec)
        return f"({names}) = ({bound})"

    def __call__(
        self,
        name: str,
        tensor: object,
        spec: Sequence[Dim],
        dtype: torch.dtype | str = "float",
    ) -> None:
        if not isinstance(tensor, Tensor):
            self._fail(TypeError, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        assert isinstance(tensor, Tensor)
        if self.device is None:
            self.device = tensor.device
        elif tensor.device != self.device:
            self._fail(
                ValueError, f"{name} is on {tensor.device}, expected {self.device} like the other inputs"
            )
        if dtype == "float":
            if not tensor.is_floating_point():
                self._fail(TypeError, f"{name} must be a floating-point tensor, got {tensor.dtype}")
            if self.float_dtype is None:
                self.float_dtype, self._first_float = tensor.dtype, name
            elif tensor.dtype != self.float_dtype and not torch.is_autocast_enabled(tensor.device.type):
                self._fail(
                    TypeError,
                    f"{name} is {tensor.dtype} but {self._first_float} is {self.float_dtype}; "
                    "use one dtype (or autocast)",
                )
        elif tensor.dtype != dtype:
            self._fail(TypeError, f"{name} must be {dtype}, got {tensor.dtype}")
        if tensor.dim() != len(spec):
            self._fail(
                ValueError,
                f"{name} must have shape {self._describe(spec)}, got {tuple(tensor.shape)}",
            )
        for dim, size in zip(spec, tensor.shape):
            expected = dim if isinstance(dim, int) else self.dims.get(dim, size)
            if size != expected:
                self._fail(
                    ValueError,
                    f"{name} must have shape {self._describe(spec)}, got {tuple(tensor.shape)}",
                )
        for dim, size in zip(spec, tensor.shape):
            if isinstance(dim, str):
                self.dims.setdefault(dim, size)
