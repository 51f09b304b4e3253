"""Sharded analyses (cifarbench.distributed): local and Ray shards against the unsharded analyses, exact merges,
resume after an interrupted driver, the model shipped by content, and the Ray errors of ``sweep``."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from cifarbench.analysis.ablation import sweep
from cifarbench.analysis.mining import mine
from cifarbench.analysis.occlusion import make_engine, occlusion_maps
from cifarbench.checkpoint import save_checkpoint
from cifarbench.data import load_split
from cifarbench.distributed import (RAY_INSTALL, check_executor, materialize, pack_model, run_sharded)
from cifarbench.errors import UserError
from cifarbench.runtime import TorchRuntime
from cifarbench.zoo import load_model

SEL = (("conv1", 0), ("conv2", 3))


@pytest.fixture(scope="module")
def data():
    return load_split("synthetic:300", "test")  # 60 images


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """net1 with conv1 filter 1 made constant (zero weights, bias 0.25): its response is the same on every
    image, so its top-K is decided by the tie rule alone (the lowest indices, across shards), and conv1 filter 2
    made dead (zero weights, bias -1). Saved as a checkpoint file, so Ray has to ship its bytes."""
    net = load_model("net1")
    with torch.no_grad():
        conv = net.conv_blocks()["conv1"].conv
        conv.weight[1] = 0
        conv.bias[1] = 0.25
        conv.weight[2] = 0
        conv.bias[2] = -1.0
    path = tmp_path_factory.mktemp("ckpt") / "tied.safetensors"
    save_checkpoint(path, net, {"net": "net1", "hparams": net.hparams})
    return path


# ---------------------------------------------------------------------------------------------- occlusion
OCC = dict(k=8, stride=8, backend="torch", mode="dense", device="cpu")


def _occlusion_reference(images):
    engine = make_engine("net1", 8, 8, "torch", "dense", "cpu")
    return occlusion_maps(engine, images.float() / 255, 8, stride=8)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_occlusion_shards_equal_the_unsharded_maps(executor, data, request, tmp_path):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    six = data.subset(slice(0, 6))
    run = run_sharded("occlusion", "net1", six, executor=executor, shard_size=2, out=tmp_path, **OCC)
    assert (run.shards, run.executed, run.skipped) == (3, 3, 0)
    assert len(list((tmp_path / "shards").glob("occlusion-*.npz"))) == 3
    ref = _occlusion_reference(six.images)
    assert len(run.result) == 6
    for (got,), want in zip(run.result, ref):
        assert got.map.shape == (4, 4)  # (32 - 8) // 8 + 1
        np.testing.assert_allclose(got.map, want.map, atol=1e-6, rtol=0)
        assert (got.target, got.predicted) == (want.target, want.predicted)
        assert got.clean_prob == pytest.approx(want.clean_prob, abs=1e-6)


# ---------------------------------------------------------------------------------------------- ablation
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ablation_sweep_shards_equal_the_unsharded_sweep(executor, data, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    forty = data.subset(slice(0, 40))
    # 2 image ranges x 2 filter groups: every merge path (counts summed over images, filters gathered) is used
    run = run_sharded("ablation", "net1", forty, executor=executor, selection=SEL, backend="torch", device="cpu",
                      batch_size=10, shard_size=20, filters_per_shard=1)
    assert run.shards == 4
    net = load_model("net1")
    want = sweep(TorchRuntime(net, "cpu"), net, forty, SEL, batch_size=10)
    assert run.result == want  # counts identical, so every accuracy and rank is the same float


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_ablation_of_a_selection_sums_confusion_cells(executor, data, request):
    """Filters zeroed together: confusion matrices summed cell by cell over image shards, flips among the first
    30 images gathered across the shard boundary at 20."""
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    from cifarbench.analysis.ablation import ablate

    forty = data.subset(slice(0, 40))
    sel = (("conv1", 0), ("conv1", 1), ("conv1", 2), ("conv2", 3))
    run = run_sharded("ablation", "net1", forty, executor=executor, selection=sel, sweep=False, flipped=30,
                      backend="torch", device="cpu", batch_size=10, shard_size=20)
    assert run.shards == 2
    net = load_model("net1")
    want = ablate(TorchRuntime(net, "cpu"), net, forty, sel, flipped=30, batch_size=10)
    assert run.result == want
    assert np.array(want["confusion"]["after"]).sum() == 40


def test_ablation_counts_are_the_definition(data):
    """Independent of the sweep code: zero the filter in a copy and count right answers per class by hand."""
    forty = data.subset(slice(0, 40))
    run = run_sharded("ablation", "net1", forty, selection=SEL[:1], backend="torch", device="cpu", batch_size=10,
                      shard_size=20)
    net = load_model("net1")
    with torch.no_grad():
        net.conv_blocks()["conv1"].conv.weight[0] = 0
        pred = net(forty.float_images()).argmax(1)
    labels = forty.labels
    for c, name in enumerate(forty.classes):
        n = int((labels == c).sum())
        want = None if n == 0 else int(((pred == c) & (labels == c)).sum()) / n
        assert run.result["filters"][0]["per_class"][name] == want


# ---------------------------------------------------------------------------------------------- mining
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_mining_shards_equal_the_unsharded_top_k(executor, data, tied_checkpoint, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    sel = (("conv1", 0), ("conv1", 1))
    run = run_sharded("mining", tied_checkpoint, data, executor=executor, selection=sel, top=5, backend="torch",
                      device="cpu", batch_size=20, shard_size=20)
    assert run.shards == 3
    net = load_model(tied_checkpoint)
    want = mine(TorchRuntime(net, "cpu"), net, data, sel, 5, batch_size=20)
    got = run.result
    np.testing.assert_array_equal(got.top_index, want.top_index)
    np.testing.assert_array_equal(got.top_response, want.top_response)
    np.testing.assert_array_equal(got.top_patch, want.top_patch)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.selection == want.selection and got.dead == want.dead
    assert got.to_json() == want.to_json()
    # the constant filter ties on every image: the tie rule alone picks images 0..4 (all in the first shard)
    assert got.top_index[1].tolist() == [0, 1, 2, 3, 4]
    assert ("conv1", 2) in got.dead


def test_mining_tie_rule_holds_across_shards(data, tied_checkpoint):
    """Shards of 1 batch of 2 images: the tied filter's top 5 spans three shards; the lower index still wins."""
    run = run_sharded("mining", tied_checkpoint, data.subset(slice(0, 10)), selection=(("conv1", 1),), top=5,
                      backend="torch", device="cpu", batch_size=2, shard_size=2)
    assert run.shards == 5
    assert run.result.top_index[0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def _stop_after_first_shard(p):
    if p.done - p.skipped >= 1:
        raise Interrupt


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_an_interrupted_run_resumes_without_redoing_finished_shards(executor, data, request, tmp_path):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    args = dict(selection=SEL, top=5, backend="torch", device="cpu", batch_size=10, shard_size=10,
                executor=executor, out=tmp_path)
    with pytest.raises(Interrupt):
        run_sharded("mining", "net1", data, progress=_stop_after_first_shard, **args)
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("mining-*.npz")}
    assert 1 <= len(kept) < 6  # the first shard at least; never all six
    seen = []
    run = run_sharded("mining", "net1", data, resume=True, progress=seen.append, **args)
    assert (run.shards, run.skipped, run.executed) == (6, len(kept), 6 - len(kept))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards were read, not rewritten
    assert len(list((tmp_path / "shards").glob("mining-*.npz"))) == 6
    assert seen[0].done == len(kept) and seen[-1].done == 6 and seen[-1].eta_s == 0
    assert all(p.images_per_s > 0 for p in seen[1:])
    net = load_model("net1")
    want = mine(TorchRuntime(net, "cpu"), net, data, SEL, 5, batch_size=10)
    np.testing.assert_array_equal(run.result.top_index, want.top_index)
    # a resumed run with nothing left computes nothing
    again = run_sharded("mining", "net1", data, resume=True, **args)
    assert (again.skipped, again.executed) == (6, 0)


def test_other_settings_never_reuse_a_shard(data, tmp_path):
    """The key covers the analysis settings and the images: another top-K or other images compute anew."""
    base = dict(selection=SEL, backend="torch", device="cpu", batch_size=10, shard_size=10, out=tmp_path)
    run_sharded("mining", "net1", data.subset(slice(0, 20)), top=5, **base)
    assert run_sharded("mining", "net1", data.subset(slice(0, 20)), top=4, resume=True, **base).skipped == 0
    assert run_sharded("mining", "net1", data.subset(slice(20, 40)), top=5, resume=True, **base).skipped == 0
    assert run_sharded("mining", "net1", data.subset(slice(0, 20)), top=5, resume=True, **base).skipped == 2


def test_a_tampered_shard_file_is_recomputed(data, tmp_path, capsys):
    base = dict(selection=SEL, top=3, backend="torch", device="cpu", batch_size=10, shard_size=10, out=tmp_path)
    first = run_sharded("mining", "net1", data.subset(slice(0, 20)), **base)
    victim = sorted((tmp_path / "shards").glob("*.npz"))[0]
    victim.write_bytes(b"not a shard")
    run = run_sharded("mining", "net1", data.subset(slice(0, 20)), resume=True, **base)
    assert (run.skipped, run.executed) == (1, 1)
    assert "unreadable shard" in capsys.readouterr().err
    np.testing.assert_array_equal(run.result.top_index, first.result.top_index)


def test_resume_needs_out(data):
    with pytest.raises(UserError, match="--resume needs --out"):
        run_sharded("mining", "net1", data, selection=SEL, resume=True)


# ---------------------------------------------------------------------------------------------- shipping
def test_a_checkpoint_travels_as_bytes_and_opens_where_the_driver_path_is_gone(tied_checkpoint, tmp_path):
    copy = tmp_path / "driver" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(tied_checkpoint.read_bytes())
    package = pack_model(copy, ship=True)
    copy.unlink()  # what a worker on another machine sees of the driver's path
    spec = materialize(package, tmp_path / "worker")
    assert spec.endswith("model.safetensors") and not spec.startswith(str(copy.parent))
    net = load_model(spec)
    assert torch.equal(net.conv_blocks()["conv1"].conv.bias[1], torch.tensor(0.25))


def test_an_onnx_model_travels_with_its_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from cifarbench.source import resolve_source

    w = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(3, 10) / 30, "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src_dir = tmp_path / "driver"
    (src_dir / "data").mkdir(parents=True)
    onnx.save_model(model, str(src_dir / "m.onnx"), save_as_external_data=True, location="data/w.bin",
                    size_threshold=0)
    want = resolve_source(src_dir / "m.onnx").digest
    package = pack_model(src_dir / "m.onnx", ship=True)
    assert [rel for rel, _ in package.files] == ["m.onnx", "data/w.bin"]
    for f in (src_dir / "m.onnx", src_dir / "data" / "w.bin"):
        f.unlink()
    spec = materialize(package, tmp_path / "worker")
    assert resolve_source(spec).digest == want  # the same bytes, external data found beside it


def test_bytes_changed_in_transit_are_refused(tied_checkpoint, tmp_path):
    from dataclasses import replace

    package = pack_model(tied_checkpoint, ship=True)
    bad = replace(package, blobs=(package.blobs[0][:-1] + b"\0",))
    with pytest.raises(RuntimeError, match="other bytes"):
        materialize(bad, tmp_path / "w")


# ---------------------------------------------------------------------------------------------- errors
def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(UserError) as exc:
        check_executor("ray")
    assert RAY_INSTALL in str(exc.value) and "\n" not in str(exc.value)


def test_an_unreachable_address_fails_within_5_s():
    pytest.importorskip("ray")
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        check_executor("ray", "127.0.0.1:1")
    assert time.perf_counter() - start < 6
    with pytest.raises(UserError, match="expected HOST:PORT"):
        check_executor("ray", "headnode")


@pytest.mark.parametrize("cpus, gpus", [(1, 1), (3, 0)])
def test_a_task_no_node_can_hold_is_refused(ray_cluster, data, cpus, gpus):
    with pytest.raises(UserError, match="no node of the Ray cluster can run one task"):
        run_sharded("mining", "net1", data, executor="ray", cpus_per_task=cpus, gpus_per_task=gpus,
                    selection=SEL, backend="torch", device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(executor="spark"), "use local or ray"),
    (dict(address="127.0.0.1:6379"), "--address needs --executor ray"),
    (dict(cpus_per_task=0), "--cpus-per-task must be > 0"),
    (dict(selection=()), "no filters selected"),
    (dict(top=0), "--top must be at least 1"),
    (dict(shard_size=0), "shard size must be at least 1"),
])
def test_bad_settings_are_user_errors(data, kwargs, match):
    args = {"selection": SEL, "backend": "torch", "device": "cpu", **kwargs}
    with pytest.raises(UserError, match=match):
        run_sharded("mining", "net1", data, **args)


def test_a_mistake_found_on_a_worker_is_one_line(ray_cluster, data):
    """The backend is opened on the worker; its UserError comes back as the same one line, not a Ray traceback."""
    with pytest.raises(UserError) as exc:
        run_sharded("mining", "net1", data, executor="ray", selection=SEL, backend="tensorrt", device="cpu")
    assert "TensorRT is not installed" in str(exc.value) and "\n" not in str(exc.value)


def test_an_in_memory_module_travels_to_ray(ray_cluster, data):
    net = load_model("net1")
    run = run_sharded("mining", net, data.subset(slice(0, 20)), executor="ray", selection=SEL, top=3,
                      backend="torch", device="cpu", batch_size=10, shard_size=10)
    want = mine(TorchRuntime(net, "cpu"), net, data.subset(slice(0, 20)), SEL, 3, batch_size=10)
    np.testing.assert_array_equal(run.result.top_index, want.top_index)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_device_the_shards_cannot_have_is_refused(data):
    with pytest.raises(UserError, match="no CUDA GPU here"):
        run_sharded("mining", "net1", data, selection=SEL, device="cuda")
    with pytest.raises(UserError, match="needs --gpus-per-task > 0"):
        run_sharded("mining", "net1", data, executor="ray", selection=SEL, device="cuda")


def test_model_folders_of_dead_workers_are_swept(tmp_path, monkeypatch):
    """A worker killed by Ray (cancel, OOM) leaves its model copy; the next worker that opens a model removes it."""
    import tempfile

    from cifarbench.distributed import _model_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "cifarbench-model-4194305.abcdefgh"  # above Linux's largest pid_max (2^22): no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x")
    mine_now = _model_folder()
    assert not dead.exists() and mine_now.is_dir() and mine_now.parent == tmp_path


KILLED_DRIVER = """
import sys, time
from cifarbench.data import load_split
from cifarbench.distributed import run_sharded
# a pause after each finished shard, so the kill lands while later shards are still to come
run_sharded("mining", "net1", load_split("synthetic:300", "test"), selection=(("conv1", 0), ("conv2", 3)), top=5,
            backend="torch", device="cpu", batch_size=10, shard_size=10, out=sys.argv[1],
            progress=lambda p: (print(p.done, flush=True), time.sleep(0.3)))
"""


def test_a_driver_killed_with_sigkill_loses_only_shards_in_flight(data, tmp_path):
    import os
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 2:  # two shards finished and saved
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("mining-*.npz")}
    assert 2 <= len(kept) < 6
    run = run_sharded("mining", "net1", data, selection=SEL, top=5, backend="torch", device="cpu", batch_size=10,
                      shard_size=10, out=tmp_path, resume=True)
    assert (run.skipped, run.executed) == (len(kept), 6 - len(kept))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert not [p for p in (tmp_path / "shards").iterdir() if p.suffix != ".npz"]  # no temporary left behind
    net = load_model("net1")
    want = mine(TorchRuntime(net, "cpu"), net, data, SEL, 5, batch_size=10)
    np.testing.assert_array_equal(run.result.top_index, want.top_index)
    np.testing.assert_array_equal(run.result.top_response, want.top_response)


def test_shard_files_are_guarded_outputs(data, tmp_path):
    """Inside the command's output_folder (shards/ among its subdirs) a rerun replaces its own shard files, and a
    file of the user's under a shard's name is never replaced."""
    from cifarbench.io import output_folder

    args = dict(selection=SEL, top=3, backend="torch", device="cpu", batch_size=10, shard_size=10, out=tmp_path)
    with output_folder(tmp_path, subdirs=("shards",)):
        first = run_sharded("mining", "net1", data.subset(slice(0, 20)), **args)
        run_sharded("mining", "net1", data.subset(slice(0, 20)), **args)  # without resume: computed and replaced
    victim = first.files[0]
    with open(victim, "wb") as f:
        f.write(b"the user's own file")
    with output_folder(tmp_path, subdirs=("shards",)):
        with pytest.raises(UserError, match="not a cifarbench output"):
            run_sharded("mining", "net1", data.subset(slice(0, 20)), **args)
    assert open(victim, "rb").read() == b"the user's own file"
