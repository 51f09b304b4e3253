"""Models for runtime and export tests whose predictions mean something, without training.

A random net predicts one class for every image (its logits barely depend on the input), so parity on it
proves little. ``fitted_model`` keeps the random conv body and fits the last linear layer by ridge regression
to the synthetic training labels (after setting BN statistics from the data): logits spread over classes with real margins, like a trained net's.
"""
from __future__ import annotations

from functools import cache

import torch

from cifarbench.nets import normalize
from conftest import random_model


@cache
def fitted_model(name: str, seed: int = 0, n: int = 300):
    from cifarbench.data import load_split

    model = random_model(name, seed)
    train = load_split("synthetic", "train").subset(slice(0, n))
    with torch.no_grad():
        # data-dependent BN statistics (as after training): every layer's pre-activation is standardized, so
        # the deep random body still separates images instead of collapsing them onto one feature vector
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.layers.train()(normalize(train.float_images()))
        model.layers.eval()
        feats = model.head[:-1](model.layers(normalize(train.float_images())))
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        z = torch.cat([(feats - mu) / sd, torch.ones(len(feats), 1)], 1)
        target = torch.nn.functional.one_hot(train.labels, 10).float() * 10 - 1
        w = torch.linalg.solve(z.T @ z + 10.0 * torch.eye(z.shape[1]), z.T @ target)
        model.head[-1].weight.copy_((w[:-1] / sd[:, None]).T)
        model.head[-1].bias.copy_(w[-1] - (mu / sd) @ w[:-1])
    return model


@cache
def sample_images(n: int = 200) -> torch.Tensor:
    from cifarbench.data import load_split

    return load_split("synthetic", "test").float_images()[:n]
