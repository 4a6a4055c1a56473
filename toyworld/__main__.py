"""Rebuild the toy world's frozen models from their seeds: ``python -m toyworld [--out models/toy]``.

Runs the toy SAM recipe (``toyworld.sam``) and the toy LMM recipe (``toyworld.lmm``) with their
default recipes, side by side, one process and one CPU thread each (the two do not depend on each
other), writing ``sam.safetensors`` + ``sam.json`` and ``llava/`` into ``--out``. Each process's
output lines are prefixed with its model's name. Both are deterministic functions of their
recipes (same torch version, one thread). The toy heads are not rebuilt here: they come from the
training job (``python jobs/train.py``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

RECIPES = {"sam": ("toyworld.sam", "sam.safetensors"), "lmm": ("toyworld.lmm", "llava")}


def _forward(name: str, stream) -> None:
    """Copy ``stream``'s lines to stdout as ``[name] line`` (blank ones, which progress bars
    leave behind, dropped)."""
    for line in stream:
        if line.strip():
            print(f"[{name}] {line.rstrip()}", flush=True)


def rebuild(out: Path, names: list[str], extra: dict[str, list[str]]) -> dict[str, int]:
    """Run the recipes ``names`` concurrently into ``out``; returns each one's exit status."""
    procs = {}
    for name in names:
        module, target = RECIPES[name]
        command = [sys.executable, "-m", module, "--out", str(out / target), *extra[name]]
        procs[name] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    threads = [
        threading.Thread(target=_forward, args=(name, p.stdout)) for name, p in procs.items()
    ]
    for t in threads:
        t.start()
    codes = {name: p.wait() for name, p in procs.items()}
    for t in threads:
        t.join()
    return codes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/toy"))
    parser.add_argument("--only", choices=tuple(RECIPES), help="rebuild one model only")
    for name, (module, _) in RECIPES.items():
        parser.add_argument(
            f"--{name}-args",
            default="",
            metavar="ARGS",
            help=f"extra arguments for python -m {module}, e.g. '--steps 100'",
        )
    args = parser.parse_args(argv)
    names = [args.only] if args.only else list(RECIPES)
    extra = {name: shlex.split(getattr(args, f"{name}_args")) for name in names}
    start = time.perf_counter()
    codes = rebuild(args.out, names, extra)
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        sys.exit(f"toy model recipe(s) failed: {', '.join(failed)} (exit {codes})")
    print(f"toy models rebuilt in {args.out}/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
