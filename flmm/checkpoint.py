"""Reading, checking, loading and saving state dicts: safetensors, or ``torch.load`` with
``weights_only=True`` (never arbitrary pickles). A leaf: imports nothing else of ``flmm``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (weights only), on CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: str | Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a state dict file, on CPU, without reading the rest: safetensors reads
    just those, a ``torch.save`` zip file (an official SAM ``.pth``) is memory-mapped. ValueError
    naming the keys the file lacks."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            _require(path, keys, set(f.keys()))
            return {k: f.get_tensor(k) for k in keys}
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    _require(path, keys, set(state_dict))
    return {k: state_dict[k].clone() for k in keys}


def _require(path: Path, keys: list[str], present: set[str]) -> None:
    absent = [k for k in keys if k not in present]
    if absent:
        raise ValueError(f"{path} has no {', '.join(absent)}")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} if none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_state_dict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming every missing, unexpected and shape-mismatched key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} != model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint does not match {type(module).__name__}:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )


def load_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``module`` after checking that keys and shapes match exactly."""
    check_state_dict(module, state_dict)
    module.load_state_dict(state_dict, strict=True)


def load_file_into(module: torch.nn.Module, path: str | Path) -> None:
    """``load_state`` of the state dict read from ``path``."""
    load_state(module, read_state_dict(path))


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as safetensors via a temp name and a rename (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)
    tmp.replace(path)
    return path
