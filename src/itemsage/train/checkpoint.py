"""Training checkpoints: a directory per step, written under a temp name then renamed; manifest last.

`checkpoints/step-XXXXXXXX/` holds `state.safetensors` (every tensor of the state: weights,
optimiser, sketch, every rank's torch RNG) and `state.json` (everything else, with the tensors'
places), then `manifest.json`. `save_checkpoint` keeps the newest `keep`; `latest_checkpoint`
skips a torn one; `load_checkpoint` rebuilds the nested state. No pickle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from itemsage import artifacts

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Nested state -> JSON-able skeleton; tensors move to `tensors` under their dotted path."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__int_keys__": {str(k): _flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): _unflatten(v, tensors) for k, v in obj["__int_keys__"].items()}
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _rng_state(sampler: Any, torch_states: list[Tensor], cuda_states: list[Tensor]) -> dict[str, Any]:
    legacy = np.random.get_state()
    py = random.getstate()
    return {
        "sampler": sampler.rng.bit_generator.state,  # PCG64 state: plain ints
        "numpy_global": [legacy[0], legacy[1], legacy[2], legacy[3], legacy[4]],
        "python": [py[0], list(py[1]), py[2]],
        "torch_cpu": torch_states,  # one per rank
        "torch_cuda": cuda_states,
    }


def _set_rng_state(state: dict[str, Any], sampler: Any, rank: int, device: torch.device) -> None:
    sampler.rng.bit_generator.state = state["sampler"]
    g = state["numpy_global"]
    np.random.set_state((g[0], np.asarray(g[1], dtype=np.uint32), g[2], g[3], g[4]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if rank < len(state["torch_cpu"]):
        torch.set_rng_state(state["torch_cpu"][rank].to(torch.uint8))
    if device.type == "cuda" and rank < len(state["torch_cuda"]):
        torch.cuda.set_rng_state(state["torch_cuda"][rank].to(torch.uint8), device)


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step-XXXXXXXX/` atomically (temp dir, manifest last, rename) and keep the newest `keep`."""
    root = out_dir / CHECKPOINT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, "state", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    artifacts.atomic_write_json(tmp / "state.json", skeleton)
    artifacts.write_manifest(tmp, "checkpoint", counts={"step": step}, files=["state.safetensors", "state.json"])
    shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step (a resumed run that had finished)
    os.replace(tmp, final)
    artifacts._fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match their manifest (a torn or half-written one is skipped)."""
    for path in sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*"), reverse=True):
        try:
            artifacts.verify_manifest(path, kind="checkpoint")
            return path
        except artifacts.ArtifactError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    tensors = load_file(str(path / "state.safetensors"))
    return _unflatten(json.loads((path / "state.json").read_text()), tensors)
