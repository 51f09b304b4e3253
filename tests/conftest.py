"""Shared test fixtures. Tests run on the CPU; GPU-marked tests skip without CUDA; data-marked ones without
``../shared/data``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# decoded data and exported artifacts go to one temp folder per session, never the user's home; set before any
# test imports cifarbench (cifarbench.data reads it at import), so session-scoped fixtures use it too
os.environ["CIFARBENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="cifarbench-tests-")
SHARED_DATA = Path(os.environ.get("CIFARBENCH_SHARED_DATA", REPO.parent / "shared" / "data" / "cifar10-jpeg75.tar.gz"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "data" in item.keywords and not SHARED_DATA.is_file():
            item.add_marker(pytest.mark.skip(reason=f"needs the CIFAR-10 copy at {SHARED_DATA}"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_file():
        pytest.skip(f"needs the CIFAR-10 copy at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_test():
    from cifarbench.data import load_split

    return load_split("synthetic", "test")


def random_model(name: str, seed: int = 0, **overrides):
    """A net with random weights and non-trivial BN statistics, in eval mode (no training needed)."""
    from cifarbench import create_model

    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 CPUs per test module that asks for it (starting Ray costs seconds); run_sharded and
    the commands find it initialized and use it as is."""
    import logging

    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cifarbench[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
