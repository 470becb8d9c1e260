"""coarsen: structured sparsity for neural networks, on NumPy arrays.

Pruning leaves zeros scattered everywhere, which hardware cannot exploit. coarsen turns such
masks into structures that kernels run fast -- channels (Refill, Refill+), groups (Regroup),
DSB's shuffled blocks, aligned blocks and N:M -- and runs them on its packed CPU kernels.

The same algorithms, options, defaults and errors as the ``coarsen`` command line:

>>> import numpy as np, coarsen
>>> rng = np.random.default_rng(0)
>>> weights = {"conv.weight": rng.standard_normal((64, 32, 3, 3), dtype=np.float32)}
>>> masks = coarsen.prune(weights, 0.8)                      # like `coarsen prune`
>>> channel, report = coarsen.convert(weights, masks, to="channel")  # Refill
>>> coarsen.check(channel["conv.weight"], "channel")         # raises when violated
>>> w = coarsen.pack(weights["conv.weight"], channel["conv.weight"])
>>> w.format
'channel'
>>> y = w.matmul(rng.standard_normal((w.shape[1], 16), dtype=np.float32))

Weights are NumPy arrays (any float dtype; PyTorch CPU tensors are accepted too), masks are
arrays of 0/1 (bool, uint8 or exact 0.0/1.0 floats) of the weight's shape; a conv weight is
given as it is, ``[Cout, Cin, kh, kw]``. Refused inputs raise :class:`CoarsenError`, a
``ValueError`` whose message names the tensor and the shapes.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Tuple, Union

import numpy as np

from . import _coarsen
from ._coarsen import CoarsenError, Model, PackedMatrix

__version__: str = _coarsen.__version__

__all__ = [
    "CoarsenError",
    "Masks",
    "Model",
    "PackedMatrix",
    "Report",
    "check",
    "convert",
    "load",
    "pack",
    "prune",
    "read_masks",
    "write_masks",
]

PATTERNS = ("channel", "channel+", "group", "shuffled-block", "block", "nm")


class Masks(dict):
    """Masks by tensor name: ``uint8`` arrays of 0/1, each of its weight's shape.

    A plain ``dict`` with one more attribute, :attr:`metadata`: the coarsen metadata a
    conversion records (pattern, parameters, and per layer its status, the reason a layer is
    left unstructured, and N:M's input-channel permutation). :func:`write_masks` writes it, so
    that ``coarsen`` reads the file as it reads one of its own.
    """

    metadata: Optional[dict]

    def __init__(self, items: Iterable = (), metadata: Optional[dict] = None):
        super().__init__(items)
        self.metadata = metadata

    @property
    def pattern(self) -> Optional[str]:
        """The pattern of the conversion that made these masks, if any."""
        return None if self.metadata is None else self.metadata.get("pattern")

    def density(self) -> float:
        """Kept fraction over all masks."""
        total = sum(m.size for m in self.values())
        return float(sum(int(np.count_nonzero(m)) for m in self.values()) / max(total, 1))

    def __repr__(self) -> str:
        layers = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in self.items())
        extra = f", pattern={self.pattern!r}" if self.pattern else ""
        return f"Masks({{{layers}}}{extra})"


class Report(dict):
    """A conversion's report: the JSON ``coarsen convert --report`` writes, as a dict.

    ``str(report)`` is the table the command line prints.
    """

    table: str

    def __init__(self, data: dict, table: str):
        super().__init__(data)
        self.table = table

    def __str__(self) -> str:
        return self.table


# --- arrays in -----------------------------------------------------------------------------


def _numpy(x: Any, what: str) -> np.ndarray:
    """``x`` as a NumPy array; a PyTorch tensor is detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 -- any conversion failure is the user's input
        raise CoarsenError(f"{what}: not an array ({type(x).__name__}): {e}") from None


def _float32(x: Any, what: str) -> np.ndarray:
    a = _numpy(x, what)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise CoarsenError(f"{what} {list(a.shape)}: dtype {a.dtype} is not a number")
    # No copy when it already is C-contiguous float32.
    return np.ascontiguousarray(a, dtype=np.float32)


def _mask(x: Any, what: str) -> np.ndarray:
    a = _numpy(x, what)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a).view(np.uint8)
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.number):
        ones = a == 1
        if not np.all(ones | (a == 0)):
            bad = a[~(ones | (a == 0))].flat[0]
            raise CoarsenError(
                f"{what} {list(a.shape)}: a mask holds 0 and 1 only; found {bad!r}"
            )
        return ones.view(np.uint8)
    raise CoarsenError(f"{what} {list(a.shape)}: dtype {a.dtype} is not a mask (bool or 0/1)")


def _named(d: Mapping[str, Any], what: str) -> list:
    if not isinstance(d, Mapping):
        raise TypeError(f"{what}: expected a dict of arrays by tensor name, got {type(d).__name__}")
    return list(d.items())


def _weights(d: Mapping[str, Any], what: str = "weights") -> list:
    out = []
    for name, x in _named(d, what):
        a = _numpy(x, f"{what}[{name!r}]")
        if not np.issubdtype(a.dtype, np.floating):
            # Integer tensors of a state_dict (BatchNorm's num_batches_tracked) are no layers;
            # the command line skips them the same way, and says so for a matrix.
            if a.ndim >= 2:
                warnings.warn(
                    f"skipping {what}[{name!r}] {list(a.shape)}: dtype {a.dtype} is not floating point",
                    stacklevel=3,
                )
            continue
        out.append((str(name), _float32(a, f"{what}[{name!r}]")))
    return out


def _masks(d: Mapping[str, Any], what: str = "masks") -> list:
    return [(str(n), _mask(x, f"{what}[{n!r}]")) for n, x in _named(d, what)]


# --- masks and conversions -----------------------------------------------------------------


def prune(
    weights: Mapping[str, Any],
    sparsity: float,
    scope: str = "global",
    mask: Optional[Mapping[str, Any]] = None,
    *,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    granularity: str = "weight",
) -> Masks:
    """Magnitude pruning, as ``coarsen prune``.

    Args:
        weights: arrays by tensor name (a model's ``state_dict`` works; non-float tensors are
            skipped).
        sparsity: the fraction to remove, strictly between 0 and 1.
        scope: ``"global"`` (one threshold over all selected layers) or ``"layer"``.
        mask: an existing mask to prune further (IMP's next round): the weights it removed stay
            removed and count toward ``sparsity``; only its layers are pruned.
        include, exclude: regular expressions on tensor names (default: every tensor of rank
            >= 2).
        granularity: ``"weight"`` (unstructured) or ``"kernel"``: whole ``kh x kw`` kernels of
            convolutions by their root mean square, the sparsity counting kernels.

    Returns:
        The masks of the selected layers.
    """
    native = _coarsen.prune(
        _weights(weights),
        float(sparsity),
        scope,
        None if mask is None else _masks(mask, "mask"),
        include,
        exclude,
        granularity,
    )
    return Masks(native)


def convert(
    weights: Optional[Mapping[str, Any]],
    masks: Mapping[str, Any],
    to: str = "group",
    *,
    seed: int = 0,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    scores: Optional[Mapping[str, Any]] = None,
    target_density: Optional[float] = None,
    target_scope: str = "layer",
    **options: Any,
) -> Tuple[Masks, Report]:
    """Converts unstructured masks into a structured pattern, as ``coarsen convert``.

    Args:
        weights: the weights, by tensor name (magnitude criteria use them), or ``None``.
        masks: the unstructured masks, by tensor name.
        to: ``"channel"`` (Refill), ``"channel+"`` (Refill+), ``"group"`` (Regroup),
            ``"shuffled-block"`` (DSB), ``"block"`` (aligned tiles) or ``"nm"``.
        seed: drives the randomised steps (partitioning, permutation escapes).
        include, exclude: regular expressions on tensor names.
        scores: per-layer row scores (channel patterns; one value per output channel).
        target_density: a density (fraction kept) to reach within one point by pruning or
            refilling whole units of the structure after conversion, as ``--target-density``;
            ``None`` keeps the density the pattern lands on.
        target_scope: ``"layer"`` (every layer reaches it) or ``"global"`` (the selected
            layers together).
        **options: the pattern's options, named as the command line's flags with ``_`` for
            ``-``: ``criterion`` ("l1" or "count"), ``extra`` (channel, channel+); ``parts``
            (a count or "auto"), ``imbalance``, ``min_rows``, ``row_tile``, ``width_ratio``,
            ``partitioner`` ("metis" or "random"), ``fallback`` ("keep" or "dense"),
            ``legacy_regroup`` (group); ``block`` (b, "HxW" or (H, W)) (shuffled-block,
            block); ``blocks``, ``similarity`` (shuffled-block); ``n``, ``m``, ``permute``, ``fill``,
            ``escape_attempts``, ``permute_window`` (nm). An option of another pattern is an error.

    Returns:
        ``(masks, report)``: every input mask, the selected ones converted, with the
        conversion's :attr:`Masks.metadata`; and the :class:`Report`. ``write_masks`` of the
        masks writes the same bytes as ``coarsen convert --out``.
    """
    if to not in PATTERNS:
        raise CoarsenError(f"to={to!r}: expected one of {', '.join(PATTERNS)}")
    tensors, meta, report, table = _coarsen.convert(
        None if weights is None else _weights(weights),
        _masks(masks),
        to,
        options,
        int(seed),
        include,
        exclude,
        None if scores is None else _weights(scores, "scores"),
        None if target_density is None else float(target_density),
        target_scope,
    )
    return (
        Masks(tensors, None if meta is None else json.loads(meta)),
        Report(json.loads(report), table),
    )


def check(
    mask: Union[Masks, Any],
    pattern: Optional[str] = None,
    *,
    name: str = "mask",
    col_perm: Optional[Iterable[int]] = None,
    **options: Any,
) -> None:
    """Checks a mask's structure; raises :class:`CoarsenError` naming the first violation.

    ``check(mask, "channel")``, ``check(mask, "group", parts=8)``,
    ``check(mask, "shuffled-block", block=16)``, ``check(mask, "block", block=(16, 8))``,
    ``check(mask, "nm", n=2, m=4, col_perm=perm)``: one array against a pattern (options as in
    :func:`convert`; for ``group`` the bound is ``parts``).

    ``check(masks)``: every structured layer of a converted :class:`Masks` against the pattern
    and per-layer permutation its metadata records.
    """
    if isinstance(mask, Masks) and pattern is None:
        meta = mask.metadata
        if not meta:
            raise CoarsenError("check(masks): these masks record no pattern; give one")
        params = json.dumps(meta.get("params", {}))
        for layer, info in meta.get("layers", {}).items():
            if info.get("status") != "structured":
                continue
            if layer not in mask:
                raise CoarsenError(f"masks.metadata names layer {layer!r}, which is not among the masks")
            _coarsen.check(
                _mask(mask[layer], f"masks[{layer!r}]"),
                meta["pattern"],
                {},
                params,
                None,
                info.get("col_perm"),
                layer,
            )
        return
    if pattern is None:
        raise TypeError("check(): give a pattern, or Masks that record one")
    parts = options.pop("parts", None) if pattern == "group" else None
    if parts is not None and not isinstance(parts, int):
        raise CoarsenError(f"parts={parts!r}: give the bound as a count")
    _coarsen.check(
        _mask(mask, name),
        pattern,
        options,
        None,
        parts,
        None if col_perm is None else [int(c) for c in col_perm],
        name,
    )


def read_masks(path: Union[str, os.PathLike]) -> Masks:
    """Reads a safetensors mask file (coarsen's or any U8/BOOL/0-1 float tensors)."""
    tensors, meta = _coarsen.read_masks(os.fspath(path))
    return Masks(tensors, None if meta is None else json.loads(meta))


def write_masks(path: Union[str, os.PathLike], masks: Mapping[str, Any]) -> None:
    """Writes masks as a safetensors file (U8 tensors, and :attr:`Masks.metadata` when
    present), atomically: a temporary file in the same directory, then a rename."""
    meta = getattr(masks, "metadata", None)
    _coarsen.write_masks(
        os.fspath(path),
        _masks(masks),
        None if meta is None else json.dumps(meta),
    )


# --- kernels and inference -----------------------------------------------------------------


def pack(
    weight: Any,
    mask: Any = None,
    format: str = "auto",
    *,
    block: Union[int, Tuple[int, int], None] = None,
    n: Optional[int] = None,
    m: Optional[int] = None,
    col_perm: Optional[Iterable[int]] = None,
) -> PackedMatrix:
    """Packs a weight under its mask into one of coarsen's formats, planned for this CPU.

    Args:
        weight: a 2-D weight ``[out, in]`` or a conv weight ``[Cout, Cin, kh, kw]`` (seen as the
            matrix ``Cout x Cin*kh*kw``).
        mask: 0/1 of the weight's shape; ``None`` keeps the nonzero weights.
        format: ``"auto"`` (chosen from the mask: dense, channel, bsr, shuffled-block, group,
            csr), or one of ``"dense"``, ``"channel"``, ``"group"``, ``"shuffled-block"``,
            ``"bsr"``, ``"nm"``, ``"csr"``. A mask that does not have the format's structure
            is refused.
        block: the tile of ``"bsr"`` (b or (H, W)) or the block of ``"shuffled-block"``.
        n, m, col_perm: ``"nm"``'s N, M and input-channel permutation (``perm[new] = old``).

    Returns:
        A :class:`PackedMatrix`: ``.matmul(x)`` is ``W @ x``, ``.t_matmul(dy)`` is
        ``W.T @ dy``; both release the GIL.
    """
    if isinstance(block, int):
        block = (block, block)
    elif block is not None:
        block = tuple(int(b) for b in block)
        if len(block) != 2:
            raise CoarsenError(f"block={block!r}: give b or (H, W)")
    return _coarsen.pack(
        _float32(weight, "weight"),
        None if mask is None else _mask(mask, "mask"),
        format,
        block,
        n,
        m,
        None if col_perm is None else [int(c) for c in col_perm],
    )


def load(path: Union[str, os.PathLike], *, dense: bool = False) -> Model:
    """Loads an export directory (``coarsen export``) onto coarsen's inference engine.

    Every conv and linear layer runs in the packed format the export records (``dense=True``:
    every layer dense, the baseline). ``model.predict(batch)`` takes ``(batch, C, H, W)``
    float32 images, normalised as in training (or pixels in [0, 1] with ``normalize=True``).
    """
    return _coarsen.load(os.fspath(path), dense)
