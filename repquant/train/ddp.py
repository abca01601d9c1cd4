"""Process environment of a training run: device, seeding, and ``torchrun`` distributed data parallel.

Under ``torchrun`` (``WORLD_SIZE > 1``) every process trains on its shard of each epoch
(``DistributedSampler``); gradients are averaged by DDP; only rank 0 evaluates and writes files.
Entry point for a multi-process run::

    torchrun --standalone --nproc_per_node 2 -m repquant.train.ddp recipes/yolov6n_bccd.yaml [--resume]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

LOGGER = logging.getLogger("repquant.train")


@dataclass(frozen=True)
class DistInfo:
    """``rank``/``local_rank``/``world_size`` of this process; (0, 0, 1) without ``torchrun``."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; under DDP each process takes ``cuda:local_rank``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Read the ``torchrun`` environment; join the process group (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), select_device(device_spec)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = select_device(device_spec, info.local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    LOGGER.info("DDP rank %d/%d on %s", info.rank, world_size, device)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and ``random`` follow the worker's torch seed, which the
    loader derives from its seeded generator, so augmentation is reproducible with workers > 0."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    version, keys, gauss = random.getstate()
    np_state: typing.Any = np.random.get_state()
    state = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def main(argv: list[str] | None = None) -> None:
    """``python -m repquant.train.ddp RECIPE [--resume] [--set key=value ...]`` (under torchrun)."""
    from repquant.recipe import yaml_load
    from repquant.train.config import load_train_config
    from repquant.train.fit import train

    parser = argparse.ArgumentParser(prog="python -m repquant.train.ddp")
    parser.add_argument("recipe")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a top-level field, value parsed as YAML")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml_load(value)
    from repquant.recipe import recipe_from_dict, recipe_to_dict
    from repquant.train.config import TrainConfig

    config = load_train_config(args.recipe)
    if overrides:  # re-validate through the recipe converter so types are checked
        config = recipe_from_dict({**recipe_to_dict(config), **overrides}, TrainConfig, source="--set")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(config, resume=args.resume)


if __name__ == "__main__":
    main()
