"""DDP: 2 CPU processes (gloo) on the same global batch end with the weights of 1 process."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train import make_dataset

from itemsage.train.config import TrainConfig
from itemsage.train.loop import train

# eps=1 and no clipping make AdamW's step nearly linear in the gradient (|g| << eps), so a gradient of
# the wrong scale (e.g. a per-rank instead of global loss normaliser) changes the weights, and float
# noise in mathematically-zero gradients is not blown up to a full step. Unequal engagement weights:
# the global weighted mean must hold across ranks.
CFG = dict(preset="tiny", model={"dropout": 0.0}, batch_size=16, random_negatives_ratio=2, max_steps=4,
           warmup_steps=1, lr=0.05, eps=1.0, grad_clip=0.0, checkpoint_every=2, eval_every=0, eval_sample=0,
           device="cpu", seed=5, engagement_weights={"save": 3.0, "checkout": 0.5})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, dataset: str, out: str, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train(dataset, out, TrainConfig(**cfg), progress=False)


def test_two_processes_match_one(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    torch.set_num_threads(1)
    one = train(dataset, tmp_path / "one", TrainConfig(**CFG), progress=False)
    mp.spawn(_rank, args=(2, _free_port(), str(dataset), str(tmp_path / "two"), CFG), nprocs=2, join=True)

    config = json.loads((tmp_path / "two" / "model" / "config.json").read_text())
    summary = config["extra"]["training"]
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["final_loss"] == pytest.approx(one.final_loss, rel=1e-5)  # the logged global loss
    a, b = load_file(str(one.model_dir / "model.safetensors")), load_file(str(tmp_path / "two/model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    # the weights really moved in the compared steps (step 2 -> 4), so matching is not trivial
    at_step2 = load_file(str(tmp_path / "one/checkpoints/step-00000002/state.safetensors"))
    assert not torch.allclose(at_step2["state.model.tower.head.fc2.weight"], a["tower.head.fc2.weight"], atol=1e-3)
