"""Rebuild the toy world's frozen models from their seeds: ``python -m toyworld [--out models/toy]``.

Runs the toy SAM recipe (``toyworld.sam``) and then the toy LMM recipe (``toyworld.lmm``) with
their default recipes, writing ``sam.safetensors`` + ``sam.json`` and ``llava/`` into ``--out``.
Both are deterministic functions of their recipes (same torch version, one thread). The toy heads
are not rebuilt here: they come from the training job (``python jobs/train.py``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from toyworld import lmm, sam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/toy"))
    parser.add_argument("--only", choices=("sam", "lmm"), help="rebuild one model only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.only in (None, "sam"):
        sam.main(["--out", str(args.out / "sam.safetensors")])
    if args.only in (None, "lmm"):
        lmm.main(["--out", str(args.out / "llava")])
    print(f"toy models rebuilt in {args.out}/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
