# Type stubs of the coarsen package (the functions live in __init__.py, the classes in the
# native module coarsen._coarsen).
import os
from typing import Any, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str
PATTERNS: Tuple[str, ...]

_Path = Union[str, os.PathLike[str]]
_Array = Any  # a NumPy array, anything np.asarray takes, or a PyTorch CPU tensor

class CoarsenError(ValueError):
    """An input coarsen refuses, or an operation that failed on it."""

class Masks(dict[str, npt.NDArray[np.uint8]]):
    metadata: Optional[dict[str, Any]]
    def __init__(self, items: Iterable[Any] = ..., metadata: Optional[dict[str, Any]] = ...) -> None: ...
    @property
    def pattern(self) -> Optional[str]: ...
    def density(self) -> float: ...

class Report(dict[str, Any]):
    table: str
    def __init__(self, data: dict[str, Any], table: str) -> None: ...

class PackedMatrix:
    """A weight matrix packed in one of coarsen's formats and planned for this CPU."""
    def matmul(
        self, x: _Array, out: Optional[npt.NDArray[np.float32]] = None, compact: bool = False
    ) -> npt.NDArray[np.float32]: ...
    def t_matmul(self, dy: _Array, out: Optional[npt.NDArray[np.float32]] = None) -> npt.NDArray[np.float32]: ...
    @property
    def format(self) -> str: ...
    @property
    def kept_rows(self) -> Optional[list[int]]: ...
    @property
    def shape(self) -> Tuple[int, int]: ...
    @property
    def weight_shape(self) -> list[int]: ...
    @property
    def nnz(self) -> int: ...
    @property
    def density(self) -> float: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def isa(self) -> str: ...

class Model:
    """A network exported by `coarsen export`, run by coarsen's inference engine."""
    def forward(self, batch: _Array, normalize: bool = False) -> npt.NDArray[np.float32]: ...
    def predict(self, batch: _Array, normalize: bool = False) -> npt.NDArray[np.int64]: ...
    @property
    def formats(self) -> dict[str, str]: ...
    @property
    def layers(self) -> list[dict[str, Any]]: ...
    @property
    def input_shape(self) -> Tuple[int, int, int]: ...
    @property
    def classes(self) -> int: ...
    @property
    def labels(self) -> Optional[list[str]]: ...
    @property
    def preprocessing(self) -> Optional[Tuple[list[float], list[float]]]: ...
    @property
    def sparsity(self) -> float: ...
    @property
    def macs_per_image(self) -> int: ...

def prune(
    weights: Mapping[str, _Array],
    sparsity: float,
    scope: str = "global",
    mask: Optional[Mapping[str, _Array]] = None,
    *,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    granularity: str = "weight",
) -> Masks: ...
def convert(
    weights: Optional[Mapping[str, _Array]],
    masks: Mapping[str, _Array],
    to: str = "group",
    *,
    seed: int = 0,
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    scores: Optional[Mapping[str, _Array]] = None,
    target_density: Optional[float] = None,
    target_scope: str = "layer",
    **options: Any,
) -> Tuple[Masks, Report]: ...
def check(
    mask: Union[Masks, _Array],
    pattern: Optional[str] = None,
    *,
    name: str = "mask",
    col_perm: Optional[Iterable[int]] = None,
    **options: Any,
) -> None: ...
def read_masks(path: _Path) -> Masks: ...
def write_masks(path: _Path, masks: Mapping[str, _Array]) -> None: ...
def pack(
    weight: _Array,
    mask: Optional[_Array] = None,
    format: str = "auto",
    *,
    block: Union[int, Tuple[int, int], None] = None,
    n: Optional[int] = None,
    m: Optional[int] = None,
    col_perm: Optional[Iterable[int]] = None,
) -> PackedMatrix: ...
def load(path: _Path, *, dense: bool = False) -> Model: ...
