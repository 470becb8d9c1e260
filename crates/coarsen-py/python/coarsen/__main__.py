"""``python -m coarsen ARGS``: runs the ``coarsen`` command line with ARGS.

The wheel holds the library; the command line is the Rust binary ``coarsen`` (``cargo install
--path crates/coarsen-cli`` from a checkout). It is looked for in ``$COARSEN_BIN``, then on
``PATH``. Without it, ``python -m coarsen --help`` says what the package offers and where to get
the binary.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import List, Optional

import coarsen

HELP = f"""coarsen {coarsen.__version__} (Python package)

The package's functions work on NumPy arrays (see help(coarsen)):
  coarsen.prune(weights, sparsity)             magnitude masks, as `coarsen prune`
  coarsen.convert(weights, masks, to=...)      Refill, Regroup, shuffled blocks, N:M, as `coarsen convert`
  coarsen.check(mask, pattern)                 a mask's structure
  coarsen.read_masks(path) / write_masks(path, masks)
  coarsen.pack(weight, mask, format=...)       a packed matrix: .matmul(x), .t_matmul(dy)
  coarsen.load(export_dir)                     an export on the inference engine: .predict(batch)

`python -m coarsen ARGS` runs the `coarsen` command line (train, prune, convert, inspect,
export, eval, bench, predict, demo, ...) when its binary is found ($COARSEN_BIN or PATH).
"""


def find_binary() -> Optional[str]:
    """The ``coarsen`` binary: ``$COARSEN_BIN``, else ``coarsen`` on ``PATH``."""
    env = os.environ.get("COARSEN_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("coarsen")


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    binary = find_binary()
    if binary is None:
        print(HELP, file=sys.stdout if args in ([], ["--help"], ["-h"]) else sys.stderr)
        print(
            "The `coarsen` binary was not found ($COARSEN_BIN, PATH). Install it from a checkout:\n"
            "  cargo install --path crates/coarsen-cli",
            file=sys.stderr,
        )
        return 0 if args in ([], ["--help"], ["-h"]) else 2
    if args in (["--help"], ["-h"]):
        print(HELP)
        sys.stdout.flush()
    os.execv(binary, [binary, *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
