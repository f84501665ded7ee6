"""Library-wide settings that are not arguments of a call.

Only one for now: how the Triton backend multiplies float32 features (half-precision features go to
the tensor cores as they are; the C++ backend always computes in float32).
"""

from __future__ import annotations

#: The choices of :func:`set_float32_precision`.
FLOAT32_PRECISIONS = ("auto", "tf32x3", "ieee", "tf32")

_settings = {"float32_precision": "auto"}


def set_float32_precision(precision: str) -> str:
    """Choose how the GPU kernels multiply float32 features; returns the previous choice.

    - ``"auto"`` (default): ``"tf32"`` when ``torch.backends.cuda.matmul.allow_tf32`` is set (the
      switch PyTorch's own matrix products follow), else ``"tf32x3"``.
    - ``"tf32x3"``: each operand split into a TF32 head and tail, three tensor-core products per
      tile: float32's accuracy (checked against a float64 reference at the float32 tolerance), about
      3x faster than ``"ieee"`` on an H200.
    - ``"ieee"``: true float32 products on the CUDA cores.
    - ``"tf32"``: one TF32 product (10-bit mantissas): fastest, with TF32's error (~1e-3).

    Example:
        >>> previous = salign_kernels.set_float32_precision("ieee")
        >>> ...                                    # float32 losses with IEEE products
        >>> salign_kernels.set_float32_precision(previous)

    Raises:
        ValueError: ``precision`` is not one of :data:`FLOAT32_PRECISIONS`.
    """
    if not isinstance(precision, str) or precision not in FLOAT32_PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(map(repr, FLOAT32_PRECISIONS))}; got {precision!r}"
        )
    previous, _settings["float32_precision"] = _settings["float32_precision"], precision
    return previous


def get_float32_precision() -> str:
    """The current choice of :func:`set_float32_precision`."""
    return _settings["float32_precision"]
