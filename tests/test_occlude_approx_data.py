"""``--mode approx`` on a dataset slice (``occlude --data D --indices A:B``): the knobs travel to the shards (local
and Ray), the JSON names them, a resume with other knobs computes anew; maps against the naive loop of occlusion_reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarbench.cli import main
from cifarbench.distributed import run_sharded
from cifarbench.kernels.approx import DEFAULT_COARSE
from cifarbench.zoo import load_model
from occlusion_reference import naive_map  # the definition, one copy

K, STRIDE = 8, 4  # a 7x7 map: the naive loop stays short
INDICES = [3, 17, 42, 250]


@pytest.fixture(scope="module")
def slice_(shared_data):
    """The test images at INDICES (as `--data D --indices` selects them) and their naive maps."""
    from cifarbench.data import load_split

    ds = load_split(str(shared_data), "test")
    sub = ds.subset(torch.tensor(INDICES))
    model = load_model("net1")
    images = sub.float_images()
    with torch.no_grad():
        targets = model(images).argmax(1).tolist()
    refs = [naive_map(model, img, K, STRIDE, t)[0] for img, t in zip(images, targets)]
    return sub, refs, targets


def _occlude(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["occlude", "--json", "--no-figures", *args])
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    return json.loads(captured.out)


def test_tau_0_in_fp32_equals_the_naive_loop_in_shards(slice_, tmp_path):
    sub, refs, targets = slice_
    run = run_sharded("occlusion", "net1", sub, shard_size=2, out=tmp_path, k=K, stride=STRIDE, backend="torch",
                      device="cpu", mode="approx", tau=0.0, coarse=2, approx_precision="fp32")
    assert (run.shards, run.executed) == (2, 2)
    for (r,), ref, t in zip(run.result, refs, targets):
        assert r.target == t and r.map.shape == (7, 7)
        assert np.abs(r.map - ref).max() <= 1e-4
        assert r.engine["mode"] == "approx" and r.engine["tau"] == 0.0 and r.engine["coarse"] == 2
        assert r.engine["precision"] == "fp32"
        assert r.engine["exact_positions"] == r.engine["positions"] == 2 * 49  # its shard's two maps, all exact


def test_cli_default_knobs_are_close_name_themselves_and_resume_only_with_the_same_knobs(slice_, shared_data,
                                                                                          tmp_path, capsys):
    _, refs, targets = slice_
    out = tmp_path / "o"
    args = ["--data", str(shared_data), "--indices", ",".join(map(str, INDICES)), "--k", str(K), "--stride",
            str(STRIDE), "--mode", "approx", "--out", str(out)]
    doc = _occlude(capsys, *args)
    engine = doc["engine"]
    assert engine["mode"] == "approx" and engine["engine"] == "approx-graph"
    assert engine["tau"] == 0.1 and engine["coarse"] == DEFAULT_COARSE and engine["precision"] in ("fp32", "bf16")
    assert engine["positions"] == len(INDICES) * 49 and 0 < engine["exact_positions"] <= engine["positions"]
    assert doc["provenance"]["mode"] == "approx"
    assert doc["provenance"]["approx"] == {"tau": 0.1, "coarse": DEFAULT_COARSE, "precision": engine["precision"]}
    assert engine["shards_resumed"] == 0
    maps = [np.array(r["map"], np.float32) for r in doc["results"]]
    assert [r["target"] for r in doc["results"]] == targets
    assert all(r["engine"]["mode"] == "approx" and r["engine"]["tau"] == 0.1 for r in doc["results"])
    assert float(np.mean([np.abs(m - ref).mean() for m, ref in zip(maps, refs)])) <= 0.02
    # the default knobs spelt out are the same knobs: every shard is reused
    again = _occlude(capsys, *args, "--tau", "0.1", "--coarse", str(DEFAULT_COARSE), "--resume")
    assert again["engine"]["shards_resumed"] == again["engine"]["shards"] >= 1
    assert [r["map"] for r in again["results"]] == [r["map"] for r in doc["results"]]
    # other knobs never reuse a shard computed with these
    other = _occlude(capsys, *args, "--tau", "0", "--coarse", "1", "--resume")
    assert other["engine"]["shards_resumed"] == 0 and other["engine"]["tau"] == 0.0
    assert other["engine"]["exact_positions"] == other["engine"]["positions"]
    if other["engine"]["precision"] == "fp32":  # tau 0 in fp32 windows is the exact map
        for r, ref in zip(other["results"], refs):
            assert np.abs(np.array(r["map"], np.float32) - ref).max() <= 1e-4


def test_knobs_without_approx_are_one_line_for_data(shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["occlude", "--data", str(shared_data), "--indices", "0:2", "--tau", "0.2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--mode approx" in err[0]


def test_knobs_travel_to_ray_workers(slice_, tmp_path, ray_cluster):
    sub, refs, _ = slice_
    run = run_sharded("occlusion", "net1", sub, executor="ray", shard_size=2, k=K, stride=STRIDE,
                      backend="torch", device="cpu", mode="approx", tau=0.0, coarse=3, approx_precision="fp32")
    assert run.executed == 2
    for (r,), ref in zip(run.result, refs):
        assert r.engine["mode"] == "approx" and r.engine["coarse"] == 3 and r.engine["tau"] == 0.0
        assert np.abs(r.map - ref).max() <= 1e-4


def test_auto_on_ray_is_decided_once_on_the_driver(slice_, tmp_path, monkeypatch, ray_cluster):
    """mode="auto" on Ray: the driver decides per K (one calibration, cached in its cache folder) and every shard
    runs that mode; the merged results carry the driver's reason. Maps equal the definition either way."""
    from cifarbench import data as data_mod

    monkeypatch.setattr(data_mod, "CACHE_DIR", tmp_path / "cache")
    sub, refs, _ = slice_
    run = run_sharded("occlusion", "net1", sub, executor="ray", shard_size=2, k=K, stride=STRIDE,
                      backend="torch", device="cpu", mode="auto")
    engines = {r.engine["engine"] for (r,) in run.result}
    assert len(engines) == 1   # every shard ran the same engine
    for (r,), ref in zip(run.result, refs):
        assert r.engine["why"].startswith("auto:") and "decided once on the driver" in r.engine["why"]
        assert np.abs(r.map - ref).max() <= 1e-4
