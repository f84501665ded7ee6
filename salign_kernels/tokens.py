"""Token inputs: ``(B, N, C)`` tokens, as ViT encoders and DenseCL-style dense heads give them.

The rest of the library takes channel-first feature maps ``(B, C, *spatial)``. Tokens are the same
data laid out the other way round: ``tokens[b, n]`` is token ``n``'s C-vector. The functions here
see a ``(B, N, C)`` tensor as the ``(B, C, 1, N)`` map ``tokens.transpose(1, 2).unsqueeze(2)`` (a
view, never a copy) and run the library's dense matching on it, so token ``n`` is flat index ``n``
and every rule of the dense matching holds per token:

- ``s(n, m) = <xa_n, xb_m>``, with ``x / max(||x||, 1e-12)`` per token when ``normalize=True``
  (cosine similarities; ``torch.nn.functional.normalize``'s formula);
- ``value[n] = max_m s(n, m)`` over the candidates ``m`` with ``mask_b[b, m]`` True, and
  ``index[n]`` = the lowest ``m`` attaining it (ties: lowest token index);
- a query with ``mask_a[b, n]`` False, or with no candidate left, gets ``index = -1``, ``value = 0``
  and is left out of the loss.

Memory layout: both compiled backends read the view through its strides. The C++ kernels take any
strides (a token's channels are innermost, the fast path); the Triton kernels see a map as
``(B, N, C)`` rows, which for the token view is the token tensor itself (no copy). So tokens that
are a slice of a larger tensor, e.g. a ViT's output without its class token ``out[:, 1:]``, are
matched in place. Gradients come back in the tokens' layout through autograd's transpose. The
reference backend builds the ``(B, N, N)`` similarity matrix, as it does for maps.

:func:`most_similar_index` and :func:`select_most_similar` are drop-in replacements for the
functions of the same names in lightly (``lightly.models.utils``, lightly 1.6.0), used by its
DenseCL example: same arguments in the same order, same outputs, without lightly's ``(B, N, M)``
similarity matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._backend import BACKEND_NAMES
from ._numerics import SUPPORTED_DTYPES
from ._validation import REDUCTIONS, _describe, check_bool, check_choice
from .functional import dense_match, local_alignment_loss


def _check_token_tensor(tokens, name: str) -> None:
    """One ``(B, N, C)`` floating tensor with no zero size."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_describe(tokens)}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor of tokens (B, N, C); got {_describe(tokens)}")
    if tokens.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({allowed}); got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} must not be empty; got {_describe(tokens)}")


def _check_same_kind(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Same dtype, same device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype; got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device; got {a.device} and {b.device}")


def _check_token_pair(tokens_a, tokens_b, name_a: str = "tokens_a", name_b: str = "tokens_b") -> None:
    """Two ``(B, N, C)`` token tensors of one shape, dtype and device."""
    _check_token_tensor(tokens_a, name_a)
    _check_token_tensor(tokens_b, name_b)
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (B, N, C); got {tuple(tokens_a.shape)} "
            f"and {tuple(tokens_b.shape)}"
        )
    _check_same_kind(tokens_a, tokens_b, name_a, name_b)


def _check_token_mask(mask, name: str, tokens: torch.Tensor) -> None:
    """None, or a bool ``(B, N)`` tensor on the tokens' device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None; got {_describe(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool; got {mask.dtype}")
    expected = tuple(tokens.shape[:2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, N) = {expected}; got {tuple(mask.shape)}")
    if mask.device != tokens.device:
        raise ValueError(f"{name} must be on the tokens' device {tokens.device}; got {mask.device}")


def _check_token_inputs(tokens_a, tokens_b, mask_a, mask_b, normalize, backend) -> None:
    _check_token_pair(tokens_a, tokens_b)
    _check_token_mask(mask_a, "mask_a", tokens_a)
    _check_token_mask(mask_b, "mask_b", tokens_a)
    check_bool(normalize, "normalize")
    check_choice(backend, "backend", BACKEND_NAMES)


def _as_map(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, C) -> (B, C, 1, N)``: the tokens as a feature map of one row, a view (no copy);
    token ``n`` is the map's flat index ``n``."""
    return tokens.transpose(1, 2).unsqueeze(2)


def _mask_as_map(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(B, N) -> (B, 1, N)``, a view."""
    return None if mask is None else mask.unsqueeze(1)


def token_match(
    tokens_a: torch.Tensor,
    tokens_b: torch.Tensor,
    *,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every token of ``tokens_a``, its most similar token of ``tokens_b`` (same sample).

    ``value[b, n] = max_m <xa_{b,n}, xb_{b,m}>`` over the tokens ``m`` with ``mask_b[b, m]`` True,
    ``index[b, n]`` = the lowest ``m`` attaining it; ``x`` is L2-normalised per token when
    ``normalize=True`` (``x / max(||x||, 1e-12)``). A query with ``mask_a[b, n]`` False, or with no
    candidate left, gets ``index = -1`` and ``value = 0``. The compiled backends never build the
    ``(B, N, N)`` similarity matrix: memory O(B N C). This is :func:`salign_kernels.dense_match` on
    the tokens seen as ``(B, C, 1, N)`` maps, without a copy.

    Args:
        tokens_a, tokens_b: ``(B, N, C)`` tokens (queries, candidates); same shape, dtype and device;
            float32, float16, bfloat16 or float64; any strides.
        mask_a, mask_b: optional bool ``(B, N)``; False removes a token as query and candidate.
        normalize: cosine similarities (True) or raw dot products.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``(values, indices)``, each ``(B, N)``. ``values`` are float32 (float64 for float64 tokens)
        and differentiable: ``d value[n] / d xa_n = xb_index[n]``, ``d value[n] / d xb_index[n] =
        xa_n``. ``indices`` are int64 token indices into ``tokens_b``, without gradient.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, dtypes that differ, a mask that is not bool,
            a ``normalize`` that is not a bool.
        ValueError: a rank other than 3, shapes or devices that differ, an empty tensor, a mask of
            a shape other than ``(B, N)``, an unknown or unavailable ``backend``.

    Example:
        >>> values, indices = token_match(torch.randn(2, 196, 64), torch.randn(2, 196, 64))
        >>> values.shape, indices.dtype
        (torch.Size([2, 196]), torch.int64)
    """
    _check_token_inputs(tokens_a, tokens_b, mask_a, mask_b, normalize, backend)
    B, N = tokens_a.shape[:2]
    values, indices = dense_match(
        _as_map(tokens_a), _as_map(tokens_b), mask_a=_mask_as_map(mask_a),
        mask_b=_mask_as_map(mask_b), normalize=normalize, backend=backend,
    )
    return values.reshape(B, N), indices.reshape(B, N)


def token_alignment_loss(
    tokens_a: torch.Tensor,
    tokens_b: torch.Tensor,
    *,
    symmetric: bool = False,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The local alignment loss between two sets of tokens.

    ``L = mean_n |1 - value[n]|`` over the valid query tokens, ``value[n]`` the similarity of token
    n's best match in ``tokens_b`` (:func:`token_match`); ``1 - cos`` for normalised tokens. It is
    :func:`salign_kernels.local_alignment_loss` (dense matching) on the tokens seen as
    ``(B, C, 1, N)`` maps, with the same reductions. Tokens carry no grid, so there is no window:
    for windowed matching on a ViT's ``h x w`` patch grid, pass
    ``tokens.transpose(1, 2).unflatten(2, (h, w))`` to ``local_alignment_loss`` instead.

    Args:
        symmetric: also match ``b -> a`` (masks swapped) and average the two directions.
        reduction: ``"mean"`` over the valid query tokens of the batch (per direction, then
            averaged; 0 when none is valid), ``"sum"`` (per direction, then averaged) or ``"none"``.
        Others: as :func:`token_match`.

    Returns:
        A scalar for ``"mean"`` / ``"sum"``; ``(B, N)`` for ``"none"`` (``(B, 2, N)`` when
        symmetric, channel 0 is a -> b), 0 at invalid tokens. float32 (float64 for float64 tokens).
        Differentiable in both token tensors (first order).

    Raises:
        As :func:`token_match`, plus ``TypeError`` for a non-bool ``symmetric`` and ``ValueError``
        for an unknown ``reduction``.

    Example:
        >>> tokens_a = torch.randn(2, 196, 64, requires_grad=True)
        >>> loss = token_alignment_loss(tokens_a, torch.randn(2, 196, 64), symmetric=True)
        >>> loss.backward()
    """
    _check_token_inputs(tokens_a, tokens_b, mask_a, mask_b, normalize, backend)
    check_bool(symmetric, "symmetric")
    check_choice(reduction, "reduction", REDUCTIONS)
    loss = local_alignment_loss(
        _as_map(tokens_a), _as_map(tokens_b), symmetric=symmetric, mask_a=_mask_as_map(mask_a),
        mask_b=_mask_as_map(mask_b), normalize=normalize, reduction=reduction, backend=backend,
    )
    if reduction != "none":
        return loss
    B, N = tokens_a.shape[:2]
    return loss.reshape(B, 2, N) if symmetric else loss.reshape(B, N)


def _padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, N, C) -> (B, length, C)`` with zero tokens after the N real ones (unchanged when
    ``length == N``)."""
    B, N, C = tokens.shape
    if N == length:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(B, length - N, C)], dim=1)


def _check_lightly_pair(x, y) -> None:
    """lightly's ``x`` ``(B, N, C)`` and ``y`` ``(B, M, C)``: one batch size and channel count."""
    _check_token_tensor(x, "x")
    _check_token_tensor(y, "y")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            "x (B, N, C) and y (B, M, C) must have the same batch size B and channels C; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    _check_same_kind(x, y, "x", "y")


def _most_similar_index(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    B, N = x.shape[:2]
    M = y.shape[1]
    with torch.no_grad():  # indices only: nothing to save for a backward
        if N == M:
            return token_match(x, y, backend=backend)[1]
        # Different token counts: both padded to one length with zero tokens that the masks remove
        # (the matching takes maps of one shape). A copy of the shorter tensor only.
        length = max(N, M)
        positions = torch.arange(length, device=x.device).expand(B, length)
        _, indices = token_match(_padded(x, length), _padded(y, length), mask_a=positions < N,
                                 mask_b=positions < M, backend=backend)
        return indices[:, :N]


def most_similar_index(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """For each token in ``x``, the index of the most similar token in ``y``: a drop-in for
    ``lightly.models.utils.most_similar_index`` (lightly 1.6.0) without its similarity matrix.

    lightly computes ``functional.normalize(x, dim=-1)``, the same for ``y``,
    ``torch.einsum("bnc,bmc->bnm", x, y).argmax(dim=2)``: ``index[b, n] = argmax_m cos(x[b, n],
    y[b, m])``, the first (lowest) index among equal maxima, as ``torch.argmax`` documents. This
    function returns the same indices from :func:`token_match` with ``normalize=True`` (same
    normalisation formula and eps 1e-12, same tie rule) in O(B (N + M) C) memory instead of the
    ``(B, N, M)`` matrix (with the compiled backends; ``backend="reference"`` builds it).
    Similarities are accumulated in float32 (float64 for float64 tokens) while lightly multiplies
    in the tokens' dtype, so two candidates whose cosines differ by a rounding error (in
    float16/bfloat16 especially) may be ordered differently; exact ties are not.

    Args:
        x: ``(B, N, C)`` tokens to find matches for.
        y: ``(B, M, C)`` tokens to search, the same B, C, dtype and device (``M`` may differ from
            ``N``, as lightly's einsum allows; then the shorter of the two is copied, padded).
        backend: keyword-only, not in lightly: as :func:`token_match`.

    Returns:
        int64 ``(B, N)``: ``y[b, index[b, n]]`` is the token of ``y[b]`` most similar to ``x[b, n]``.
        No gradient (``argmax`` has none either).

    Raises:
        TypeError: a non-tensor, a non-floating dtype (lightly's ``normalize`` fails on integers
            too), dtypes that differ.
        ValueError: a rank other than 3, batch sizes or channel counts that differ, devices that
            differ, an empty tensor, an unknown or unavailable ``backend``.

    Example:
        >>> index = most_similar_index(torch.randn(2, 49, 128), torch.randn(2, 49, 128))
        >>> index.shape
        torch.Size([2, 49])
    """
    _check_lightly_pair(x, y)
    check_choice(backend, "backend", BACKEND_NAMES)
    return _most_similar_index(x, y, backend)


def select_most_similar(x: torch.Tensor, y: torch.Tensor, y_values: torch.Tensor, *,
                        backend: str = "auto") -> torch.Tensor:
    """For each token in ``x``, the entry of ``y_values`` at its most similar token in ``y``: a
    drop-in for ``lightly.models.utils.select_most_similar`` (lightly 1.6.0).

    lightly computes ``index = most_similar_index(x, y)`` and
    ``torch.gather(y_values, 1, index.unsqueeze(-1).expand(y_values.shape))``, i.e.
    ``out[b, n] = y_values[b, index[b, n]]``; this function does the same with
    :func:`most_similar_index`'s indices (same ties, no similarity matrix). DenseCL uses it to pick,
    for each query token of one view, the key token of the other view at the most similar backbone
    feature: ``select_most_similar(query_features, key_features, key_projections)``.

    Args:
        x: ``(B, N, C)`` tokens to find matches for.
        y: ``(B, M, C)`` tokens to search (same B, C, dtype and device as ``x``).
        y_values: ``(B, M, D)``, one row per token of ``y``, any dtype, on ``x``'s device.
        backend: keyword-only, not in lightly: as :func:`token_match`.

    Returns:
        ``(B, N, D)`` in ``y_values``' dtype. Differentiable in ``y_values`` (``gather``'s gradient:
        each selected row receives the sum of the gradients of the outputs that picked it), not in
        ``x`` or ``y``, as in lightly. lightly's ``expand(y_values.shape)`` needs ``N == M`` (for
        ``N == 1`` it repeats the one selected row M times, otherwise it raises); for ``M != N``
        this returns the ``(B, N, D)`` its docstring describes.

    Raises:
        As :func:`most_similar_index`, plus ``TypeError`` for a ``y_values`` that is not a tensor
        and ``ValueError`` for one whose shape is not ``(B, M, D)`` or that is on another device.

    Example:
        >>> query, key = torch.randn(2, 49, 2048), torch.randn(2, 49, 2048)
        >>> key_projections = torch.randn(2, 49, 128)
        >>> select_most_similar(query, key, key_projections).shape
        torch.Size([2, 49, 128])
    """
    _check_lightly_pair(x, y)
    if not isinstance(y_values, torch.Tensor):
        raise TypeError(f"y_values must be a torch.Tensor; got {_describe(y_values)}")
    B, M = y.shape[:2]
    if y_values.dim() != 3 or tuple(y_values.shape[:2]) != (B, M):
        raise ValueError(
            f"y_values must have shape (B, M, D) with (B, M) = {(B, M)}, one row per token of y; "
            f"got {_describe(y_values)}"
        )
    if y_values.device != x.device:
        raise ValueError(f"y_values must be on the tokens' device {x.device}; got {y_values.device}")
    check_choice(backend, "backend", BACKEND_NAMES)
    index = _most_similar_index(x, y, backend)
    return torch.gather(y_values, 1, index.unsqueeze(-1).expand(-1, -1, y_values.shape[2]))
