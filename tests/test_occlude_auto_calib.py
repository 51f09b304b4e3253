"""``mode="auto"`` decides by measurement where the FLOP rule is not clear-cut: the decision is timed on a bounded
subset of positions, cached per model, machine and K (a second call times nothing), says what it measured, and
whatever it picks, its maps are the dense engine's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from byo_models import resnet20
from conftest import random_model

from cifarbench import data
from cifarbench.analysis import occlusion as occ
from cifarbench.analysis.occlusion import make_engine, occlusion_maps
from cifarbench.errors import UserError
from cifarbench.kernels.incremental_graph import GraphOcclusion
from cifarbench.source import resolve_source


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache folder and the measuring policy, whatever the environment says."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setenv("CIFARBENCH_AUTO", "measure")
    return tmp_path / "auto"


@pytest.fixture(scope="module")
def model():
    """A narrow ResNet-20: its plan costs ~72 % of dense's FLOPs at K=8, stride 3, so auto must time it."""
    torch.manual_seed(0)
    return resnet20(width=8).eval()


@pytest.fixture(scope="module")
def built(model):
    """The model's source, dense runtime and incremental engine, built once: each test passes a copy without the
    chosen engines to make_engine (as the CLI reuses them across K), so auto decides again from the file."""
    cache: dict = {}
    make_engine(model, 8, 3, "torch", "incremental", "cpu", cache=cache)
    make_engine(model, 8, 3, "torch", "dense", "cpu", cache=cache)
    return cache


@pytest.fixture
def fresh(built):
    return lambda: {key: v for key, v in built.items() if not (isinstance(key, tuple) and key[0] == "engine")}


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _records(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_the_decision_is_measured_once_then_cached(cache_dir, model, monkeypatch, fresh):
    runs = occ.CALIBRATIONS["runs"]
    first = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    assert occ.CALIBRATIONS["runs"] == runs + 1
    (record,) = _records(cache_dir)
    assert record["key"]["k"] == 8 and record["key"]["stride"] == 3 and record["key"]["size"] == 32
    assert record["key"]["model"] == resolve_source(model).digest and first.describe()["auto"]["file"].endswith(".json")
    assert record["choice"] == first.mode and record["incremental_ms"] > 0 and record["dense_ms"] > 0
    # the faster estimate wins
    assert (record["incremental_ms"] < record["dense_ms"]) == (first.mode == "incremental")
    why = first.describe()["why"]
    assert why.startswith(f"auto: {first.mode}, measured: incremental ") and " ms vs dense " in why
    assert "per map at K=8, stride 3" in why and "timed now" in why
    assert first.describe()["auto"]["cached"] is False

    # a second decision (the chosen engine is not kept: a new process would do the same) reads the file only
    def no_timing(*args, **kwargs):
        raise AssertionError("a cached decision was measured again")

    monkeypatch.setattr(occ, "measure_auto", no_timing)
    second = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    assert occ.CALIBRATIONS["runs"] == runs + 1
    assert second.mode == first.mode and "(cached" in second.describe()["why"]
    assert second.describe()["auto"]["cached"] is True and len(_records(cache_dir)) == 1


def test_the_key_changes_with_k(cache_dir, model, fresh):
    make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    make_engine(model, 6, 3, "torch", "auto", "cpu", cache=fresh())
    keys = [r["key"] for r in _records(cache_dir)]
    assert len(keys) == 2 and sorted(k["k"] for k in keys) == [6, 8]
    assert {key: v for key, v in keys[0].items() if key != "k"} == {key: v for key, v in keys[1].items() if key != "k"}
    key = keys[0]
    assert key["cpu"] and key["threads"] == torch.get_num_threads() and key["torch"] == torch.__version__
    assert key["device"] == "cpu" and key["backend"] == "torch" and key["engine"] == "incremental-graph"


def test_the_calibration_times_a_bounded_subset(cache_dir, model, monkeypatch, fresh):
    """K=8, stride 3: a 9x9 map (81 positions); the calibration may time CALIB_SIDE^2 positions per run and a
    few runs, never a whole map."""
    timed = {"incremental": [], "dense": []}
    graph_logits, dense_logits = GraphOcclusion.logits, occ.DenseEngine.logits

    def counting_graph(self, images, baselines, k, stride=1, positions=None, **kw):
        timed["incremental"].append(81 if positions is None else len(positions))
        return graph_logits(self, images, baselines, k, stride, positions=positions, **kw)

    def counting_dense(self, images, baselines, k, stride, span=None):
        timed["dense"].append(81 if span is None else span[1] - span[0])
        return dense_logits(self, images, baselines, k, stride, span)

    monkeypatch.setattr(GraphOcclusion, "logits", counting_graph)
    monkeypatch.setattr(occ.DenseEngine, "logits", counting_dense)
    engine = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    info = engine.describe()["auto"]
    side = occ.CALIB_SIDE
    # the incremental side: at least the lattice, and the full map's first parallel round (workers x one step);
    # on this 9x9 map that is every position. The dense side: the lattice's worth.
    graph_engine = fresh()["incremental"][0].engine
    expected = min(81, max(side * side, graph_engine.workers * graph_engine.step_positions(8, 3, 32)))
    assert info["positions"] == expected and info["map_positions"] == 81
    # a warm-up (a cold dense backend must not lose), then one run per round
    assert 2 <= len(timed["dense"]) <= 1 + occ.CALIB_REPEATS and set(timed["dense"]) == {side * side}
    # a warm-up, then per round the subset and the empty call that times the fixed cost
    assert 3 <= len(timed["incremental"]) <= 1 + 2 * occ.CALIB_REPEATS
    assert set(timed["incremental"]) == {0, expected}
    assert 0 < info["calibration_ms"] < 60_000


def test_auto_maps_equal_dense_maps_whatever_it_picks(cache_dir, model, images, fresh):
    auto = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    dense = make_engine(model, 8, 3, "torch", "dense", "cpu", cache=fresh())
    assert auto.describe()["why"].startswith("auto:") and dense.mode == "dense"
    for a, d in zip(occlusion_maps(auto, images, 8, stride=3), occlusion_maps(dense, images, 8, stride=3)):
        assert a.target == d.target and np.abs(a.map - d.map).max() <= 1e-5
    # and the other way round: force the other choice through a planted decision, the maps stay the same
    (path,) = cache_dir.glob("*.json")
    record = json.loads(path.read_text())
    other = "dense" if record["choice"] == "incremental" else "incremental"
    record.update(choice=other, incremental_ms=1.0 if other == "incremental" else 2.0,
                  dense_ms=2.0 if other == "incremental" else 1.0)
    path.write_text(json.dumps(record))
    flipped = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    assert flipped.mode == other
    for a, d in zip(occlusion_maps(flipped, images, 8, stride=3), occlusion_maps(dense, images, 8, stride=3)):
        assert np.abs(a.map - d.map).max() <= 1e-5


def test_a_chain_net_is_timed_on_the_layer_graph_proxy(cache_dir, images):
    net = random_model("net4", seed=3, l1_oc=16)  # plan: ~54 % of dense's FLOPs at K=8, stride 3
    cache: dict = {}
    engine = make_engine(net, 8, 3, "torch", "auto", "cpu", cache=cache)
    info = engine.describe()["auto"]
    assert info["policy"] == "measure" and info["proxy"] == "incremental-graph"
    assert occ.CALIB_SIDE ** 2 <= info["positions"] <= info["map_positions"] == 81
    dense = make_engine(net, 8, 3, "torch", "dense", "cpu", cache=cache)
    for a, d in zip(occlusion_maps(engine, images, 8, stride=3), occlusion_maps(dense, images, 8, stride=3)):
        assert np.abs(a.map - d.map).max() <= 1e-5


def test_clear_flop_ratios_and_the_flops_policy_time_nothing(cache_dir, model, monkeypatch, fresh):
    runs = occ.CALIBRATIONS["runs"]
    clear = make_engine(random_model("net1", seed=2), 8, 1, "torch", "auto", "cpu")  # plan: ~25 % of dense
    assert clear.mode == "incremental" and "not timed" in clear.describe()["why"]
    monkeypatch.setenv("CIFARBENCH_AUTO", "flops")
    ruled = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    assert ruled.mode == "incremental" and "CIFARBENCH_AUTO=flops" in ruled.describe()["why"]
    assert occ.CALIBRATIONS["runs"] == runs and not cache_dir.exists()
    monkeypatch.setenv("CIFARBENCH_AUTO", "fastest")
    with pytest.raises(UserError, match="CIFARBENCH_AUTO must be measure or flops"):
        make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())


def test_a_damaged_record_is_measured_again_with_one_warning(cache_dir, model, capsys, fresh, built):
    engine, _ = built["incremental"]
    path = occ.auto_cache_path(occ.auto_key(built["source"], engine, "torch", torch.device("cpu"), 8, 3, {},
                                            dense_chunk=occ.DENSE_CHUNK["cpu"]))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    runs = occ.CALIBRATIONS["runs"]
    again = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "measuring again" in err[0]
    assert occ.CALIBRATIONS["runs"] == runs + 1 and "timed now" in again.describe()["why"]
    assert json.loads(path.read_text())["choice"] in ("incremental", "dense")


def test_a_record_whose_choice_contradicts_its_times_is_measured_again(cache_dir, model, capsys, fresh, built):
    engine, _ = built["incremental"]
    key = occ.auto_key(built["source"], engine, "torch", torch.device("cpu"), 8, 3, {},
                       dense_chunk=occ.DENSE_CHUNK["cpu"])
    path = occ.auto_cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "choice": "dense", "incremental_ms": 1.0, "dense_ms": 50.0}))
    runs = occ.CALIBRATIONS["runs"]
    again = make_engine(model, 8, 3, "torch", "auto", "cpu", cache=fresh())
    assert "measuring again" in capsys.readouterr().err
    assert occ.CALIBRATIONS["runs"] == runs + 1 and "timed now" in again.describe()["why"]
