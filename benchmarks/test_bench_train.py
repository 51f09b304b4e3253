"""Training throughput: the fast recipe's step against the seed recipe's loop, same net, same device, one run.

Each round is a fixed number of real optimizer steps (augmentation included) on random uint8 images; the ratio of
images/s is what the foundation issue asks for.
"""
from __future__ import annotations

import os

import pytest
import torch

from cifarbench.nets import count_flops
from cifarbench.train import TrainConfig, batch_input, build, train_step
from conftest import DEVICE, sync

NET = os.environ.get("CIFARBENCH_BENCH_TRAIN_NET", "net4")
STEPS = 20 if DEVICE.type == "cuda" else 2


@pytest.mark.parametrize("recipe", ["seed", "fast"])
def test_train_throughput(benchmark, record, recipe):
    benchmark.group = f"train-{NET}"
    cfg = TrainConfig(NET, recipe=recipe, data="synthetic").resolved()
    model, opt = build(cfg, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randint(0, 256, (cfg["batch_size"], 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    labels = torch.randint(0, 10, (cfg["batch_size"],), device=DEVICE)
    autocast = cfg["autocast"] and DEVICE.type == "cuda"

    def steps():
        for _ in range(STEPS):
            train_step(model, opt, batch_input(images, cfg, gen), labels, cfg, autocast)
        sync()

    benchmark.pedantic(steps, rounds=int(os.environ.get("CIFARBENCH_BENCH_ROUNDS", 3)), warmup_rounds=1)
    n = STEPS * cfg["batch_size"]
    # forward + backward ~ 3x the forward FLOPs
    record(images=n, flops=3 * count_flops(model) * n, recipe=recipe, batch=cfg["batch_size"],
           precision="bf16-autocast" if autocast else "fp32", net=NET)
