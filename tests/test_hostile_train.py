"""Hostile and mistaken input to training and checkpoints (issue 12): exact resume from the saved run, options that
contradict it, runs killed in their first epoch, bounded hyper-parameters and checkpoint headers (checked before
anything is allocated), damaged or malicious resume states and configs, NaN weights, and a full disk while saving.

Every case goes through the CLI and asserts what the user sees: the exit code, the one ``error:`` line, a file's
bytes, the weights a run ends with, the peak memory of the process."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifarbench.checkpoint import save_checkpoint
from cifarbench.cli import main
from cifarbench.nets import count_parameters, plan_parameters
from cifarbench.zoo import MAX_PARAMETERS, create_model, get_spec
from cli_helpers import assert_user_error, run_cli

DATA = "synthetic:512"
NET = ["net1", "--set", "l1_oc=4"]  # 46 k parameters: a run of two epochs takes about a second


def _cli(*args) -> int:
    """Exit code of an in-process CLI run, for fixtures (no capsys at module scope)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """An uninterrupted two-epoch run: the reference every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert _cli("train", *NET, "--epochs", "2", "--batch-size", "64", "--data", DATA, "--out", out) == 0
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert list(wa) == list(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _results(metrics: Path) -> list[str]:
    """metrics.csv without the duration columns (wall-clock times differ between runs, results must not)."""
    lines = metrics.read_text().splitlines()
    return [",".join(line.split(",")[:6]) for line in lines]


# ---------------------------------------------------------------------------------------------- exact resume
def test_resume_without_data_uses_the_saved_runs_data_and_extends_it(base_run, tmp_path, capsys, monkeypatch):
    import cifarbench.data

    def no_download(*args, **kwargs):  # a tripwire: resuming a synthetic run must never reach CIFAR-10
        raise AssertionError("resume tried to load CIFAR-10")

    monkeypatch.setattr(cifarbench.data, "_torchvision", no_download)
    run = _copy(base_run, tmp_path / "run")
    # options equal to the saved run's are allowed; everything not given comes from the saved run
    code, _, err = run_cli(capsys, "train", "net1", "--resume", run, "--epochs", "3", "--seed", "0", "--lr", "0.01",
                           "--set", "l1_oc=4")
    assert code == 0, err
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3
    assert _results(run / "metrics.csv")[:3] == _results(base_run / "metrics.csv")  # epochs 1-2 kept as they were
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == DATA and config["batch_size"] == 64
    # the new total is the run's: a plain --resume later continues it (it refused, reading the old total of 2)
    assert config["epochs"] == 3 and "warning:" not in err  # the seed recipe's constant rate: nothing re-timed
    code, _, err = run_cli(capsys, "train", "net1", "--resume", run)
    assert code == 0, err
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_extending_a_one_cycle_run_says_its_schedule_is_re_timed(tmp_path, capsys):
    run = tmp_path / "fast"
    code, _, err = run_cli(capsys, "train", *NET, "--recipe", "fast", "--epochs", "1", "--batch-size", "64",
                           "--data", DATA, "--out", run)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "net1", "--resume", run, "--epochs", "2")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "re-times its onecycle" in warnings[0], err
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("option,match", [
    (["--data", "synthetic:2000"], "--data synthetic:2000"),
    (["--data", "cifar10"], "--data cifar10"),
    (["--lr", "0.1"], "--lr 0.1 contradicts the saved run's lr 0.01"),
    (["--seed", "1"], "--seed 1 contradicts"),
    (["--set", "l1_oc=6"], "--set l1_oc=6 contradicts the saved run's l1_oc=4"),
    (["--set", "filter_multiplier=1.5"], "--set filter_multiplier=1.5 contradicts"),
    (["--recipe", "fast"], "--recipe fast contradicts"),
    (["--batch-size", "32"], "--batch-size 32 contradicts"),
    (["--epochs", "1"], "--epochs 1 is fewer than the 2 epochs"),
])
def test_resume_with_a_contradicting_option_names_it_and_changes_nothing(base_run, tmp_path, capsys, option,
                                                                         match):
    run = _copy(base_run, tmp_path / "run")
    before = _snapshot(run)
    assert_user_error(capsys, "train", "net1", "--resume", run, *option, match=match)
    assert _snapshot(run) == before


def test_resume_refuses_data_whose_identity_changed(base_run, tmp_path, capsys):
    """The saved run's data source now yields other data (here: its recorded identity no longer matches)."""
    run = _copy(base_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data_identity"] = config["data_identity"] + "-before"
    (run / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3", match="has changed since")


def test_a_run_killed_during_epoch_1_resumes_from_the_start_bit_identically(base_run, tmp_path, capsys):
    # what `kill -9` during epoch 1 leaves: config.json (written before training starts) and a temporary file of
    # the checkpoint being written, named with the dead writer's pid
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(base_run / "config.json", killed / "config.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = killed / f".best.safetensors.{int(dead.stdout)}.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert_user_error(capsys, "train", *NET, "--data", DATA, "--out", killed, match="--resume")
    code, _, err = run_cli(capsys, "train", "net1", "--resume", killed)
    assert code == 0, err
    _assert_same_weights(killed / "last.safetensors", base_run / "last.safetensors")
    _assert_same_weights(killed / "best.safetensors", base_run / "best.safetensors")
    assert _results(killed / "metrics.csv") == _results(base_run / "metrics.csv")
    assert not stale.exists()


def test_resume_after_epochs_were_finished_needs_the_state(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "run")
    (run / "last.state.pt").unlink()
    assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3", match="last.state.pt is missing")


# ---------------------------------------------------------------------------------- damaged resume folders
def _state(run: Path) -> dict:
    return torch.load(run / "last.state.pt", weights_only=True)


def _wrong_weight_shape(s):
    s["model"]["layers.conv1.conv.weight"] = torch.zeros(5, 3, 3, 3)


def _wrong_momentum_shape(s):
    key = next(iter(s["optimizer"]["state"]))
    s["optimizer"]["state"][key]["momentum_buffer"] = torch.zeros(7)


@pytest.mark.parametrize("damage,match", [
    (_wrong_weight_shape, "conv1.conv.weight has shape [5, 3, 3, 3]"),
    (_wrong_momentum_shape, "momentum_buffer"),
    (lambda s: s.update(epoch="two"), "epoch is 'two'"),
    (lambda s: s.update(epoch=True), "epoch is True"),
    (lambda s: s.update(epoch=10**9), "epoch 1000000000 is out of range"),
    (lambda s: s.pop("optimizer"), "no optimizer"),
    (lambda s: s["optimizer"].update(param_groups=[]), "parameter groups"),
    (lambda s: s.update(history=[]), "history"),
    (lambda s: s.update(rng_cpu=torch.zeros(3)), "rng_cpu"),
])
def test_a_damaged_training_state_is_one_line(base_run, tmp_path, capsys, damage, match):
    run = _copy(base_run, tmp_path / "run")
    state = _state(run)
    damage(state)
    torch.save(state, run / "last.state.pt")
    line = assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3", match=match)
    assert "not a valid cifarbench training state" in line or "epochs" in line


def test_a_truncated_training_state_is_one_line(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "run")
    data = (run / "last.state.pt").read_bytes()
    (run / "last.state.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3",
                      match="not a valid cifarbench training state")


class _Payload:
    """Unpickling this runs a shell command: what a malicious 'training state' would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_training_state_is_refused_without_torchs_unsafe_advice(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = _state(run)
    state["history"] = _Payload(marker)
    torch.save(state, run / "last.state.pt")
    line = assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3",
                             match="not a valid cifarbench training state")
    assert "never loads pickled code" in line
    assert "weights_only" not in line  # torch's advice: "Re-running torch.load with weights_only=False ..."
    assert not marker.exists()


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json is corrupt"),
    ("[1, 2]", "config.json is corrupt"),
    (None, "config.json is corrupt"),  # None: the real file cut in half
    ("{}", "config.json is incomplete (no net)"),
])
def test_a_corrupt_or_incomplete_config_is_one_line(base_run, tmp_path, capsys, text, match):
    run = _copy(base_run, tmp_path / "run")
    real = (run / "config.json").read_text()
    (run / "config.json").write_text(real[: len(real) // 2] if text is None else text)
    assert_user_error(capsys, "train", "net1", "--resume", run, match=match)


@pytest.mark.parametrize("key,value,match", [
    ("lr", "fast", "lr='fast'"),
    ("lr", float("nan"), "lr=nan"),
    ("epochs", "two", "epochs='two'"),
    ("net", 7, "net=7"),
    ("hparams", [4], "hparams=[4]"),
    ("hparams", {"l1_oc": 100000}, "l1_oc=100000"),
    ("recipe", "slow", "unknown recipe"),
    ("lr", None, "incomplete (no lr)"),
])
def test_a_config_with_a_wrong_value_is_one_line(base_run, tmp_path, capsys, key, value, match):
    run = _copy(base_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (run / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, "train", "net1", "--resume", run, match=match)


# ----------------------------------------------------------------------------------------- bad option values
@pytest.mark.parametrize("args,match", [
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "-0.1"], "--lr -0.1"),
    (["--set", "filter_multiplier=nan"], "filter_multiplier=nan"),
    (["--set", "filter_multiplier=inf"], "filter_multiplier=inf"),
    (["--set", "filter_multiplier=0.01"], "at least one"),  # int(4 * 0.01) = 0 filters in conv2
    (["--set", "l1_oc=100000"], "l1_oc=100000"),
    (["--set", "l1_oc=0"], "l1_oc=0"),
    (["--set", "l1_oc=4.5"], "l1_oc=4.5"),
    (["--set", "stride=9"], "stride=9"),
    (["--set", "kernel_size=100000"], "shrinks the image"),
    (["--batch-size", "10000000"], "--batch-size"),
    (["--seed", "-1"], "--seed -1"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    assert_user_error(capsys, "train", *NET[:1], *args, "--data", DATA, "--out", out, match=match)
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["--set", "dropout=nan"], "dropout=nan"),
    (["--set", "l1_oc=1024", "--set", "filter_multiplier=16"], f"at most {MAX_PARAMETERS:,}"),
])
def test_net4_bad_values_are_refused(tmp_path, capsys, args, match):
    assert_user_error(capsys, "train", "net4", *args, "--data", DATA, "--out", tmp_path / "run", match=match)


def test_sweep_grids_use_the_same_checks(tmp_path, capsys):
    assert_user_error(capsys, "sweep", "net1", "--grid", "filter_multiplier=2,nan", "--data", DATA,
                      "--out", tmp_path / "s", match="filter_multiplier=nan")
    assert_user_error(capsys, "sweep", "net1", "--grid", "l1_oc=6,100000", "--data", DATA,
                      "--out", tmp_path / "s", match="l1_oc=100000")


@pytest.mark.parametrize("name,hp", [
    ("net1", {}), ("net1", {"l1_oc": 3, "filter_multiplier": 1.5, "kernel_size": 5, "stride": 2}),
    ("net2", {"kernel_size": 7}), ("net3", {"l1_oc": 32}), ("net4", {}),
    ("net4", {"l1_oc": 5, "filter_multiplier": 1.7}),
])
def test_the_size_bound_counts_what_the_net_builds(name, hp):
    """The arithmetic count the bound is checked against equals the built net's parameter count."""
    spec = get_spec(name)
    model = create_model(name, **hp)
    assert plan_parameters(spec, model.hparams) == count_parameters(model)


# ------------------------------------------------------------------------------------ hostile checkpoints
def _safetensors_bytes(meta, tensors: dict[str, tuple[str, list[int]]], pad_to: int = 1024) -> bytes:
    """A safetensors file written by hand (so its metadata and header may claim anything), zero-filled data;
    ``meta`` is the cifarbench metadata (JSON-encoded here) or, as a string, its raw text."""
    sizes = {"F32": 4, "I64": 8}
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    header, offset = {"__metadata__": {"cifarbench": raw}}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * max(0, pad_to - 8 - len(text) - offset)
    return struct.pack("<Q", len(text)) + text + b"\0" * offset


def _good_checkpoint(path: Path, meta_hparams: dict) -> Path:
    """Real net1 l1_oc=4 weights under metadata that claims ``meta_hparams``."""
    save_checkpoint(path, create_model("net1", l1_oc=4), {"net": "net1", "hparams": meta_hparams})
    return path


@pytest.mark.parametrize("meta,match", [
    ({"net": "net1", "hparams": "l1_oc=4"}, "hparams is of type str"),
    ({"net": "net1", "hparams": [4]}, "hparams is of type list"),
    ({"net": 1, "hparams": {}}, "net is of type int"),
    ({"net": ["net1"], "hparams": {}}, "net is of type list"),
    ({"net": "net9", "hparams": {}}, "unknown net"),
    ({"net": "net1", "hparams": {"l1_oc": True}}, "l1_oc=True"),
    ({"net": "net1", "hparams": {"l1_oc": None}}, "l1_oc=None"),
    ({"net": "net1", "hparams": {"l1_oc": 100000}}, "l1_oc=100000"),
])
def test_checkpoint_metadata_of_the_wrong_type_is_one_line(tmp_path, capsys, meta, match):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(meta, {"w": ("F32", [1])}))
    assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match=match)


@pytest.mark.parametrize("raw", ["[1, 2]", "7", "null", "{broken"])
def test_metadata_that_is_not_an_object_is_one_line(tmp_path, capsys, raw):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(raw, {"w": ("F32", [1])}))
    assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="corrupt metadata")


def test_a_checkpoint_whose_shapes_disagree_with_its_hparams_is_one_line(tmp_path, capsys):
    # weights of net1 l1_oc=4 under metadata that says l1_oc=6: loading would fail (or, for a head-only
    # disagreement, silently mis-slice) only after building the net the metadata describes
    path = _good_checkpoint(tmp_path / "x.safetensors", {"l1_oc": 6})
    assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="conv1.conv.weight has shape [4, 3, 3, 3]")
    path = tmp_path / "y.safetensors"
    path.write_bytes(_safetensors_bytes({"net": "net1", "hparams": {"l1_oc": 4}}, {"w": ("F32", [1])}))
    assert_user_error(capsys, "eval", path, "--data", "synthetic:20", match="does not match net1")


def test_nan_weights_load_with_one_warning_line(tmp_path, capsys):
    model = create_model("net1", l1_oc=4)
    with torch.no_grad():
        model.head[-1].weight[0, 0] = float("nan")
        model.head[-1].bias[1] = float("inf")
    save_checkpoint(tmp_path / "nan.safetensors", model, {"net": "net1", "hparams": {"l1_oc": 4}})
    code, out, err = run_cli(capsys, "eval", tmp_path / "nan.safetensors", "--data", "synthetic:20", "--json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "NaN or Inf" in warnings[0] and "head.7" in warnings[0], err
    # a clean checkpoint loads without one
    save_checkpoint(tmp_path / "ok.safetensors", create_model("net1", l1_oc=4), {"net": "net1",
                                                                                  "hparams": {"l1_oc": 4}})
    code, _, err = run_cli(capsys, "eval", tmp_path / "ok.safetensors", "--data", "synthetic:20", "--json")
    assert code == 0 and "warning:" not in err


# --------------------------------------------------------------------------- bounded memory (subprocess)
_MEASURE = textwrap.dedent("""
    import contextlib, io, json, sys, time
    import cifarbench.cli, cifarbench.train, cifarbench.zoo, cifarbench.runtime  # the imports every case needs

    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

    def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    results = []
    for argv in json.loads(sys.argv[1]):
        reset_peak()
        base, err, t0 = hwm_mb(), io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err):
            try:
                cifarbench.cli.main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0,
                        "base_mb": base, "peak_mb": hwm_mb()})
    print(json.dumps(results))
""")


def test_hostile_sizes_fail_fast_in_bounded_memory(tmp_path):
    """Each case would allocate gigabytes if the net were built first (l1_oc=100000: 6.5 GB); each must fail in
    one line within a few seconds, its peak memory within 100 MB of the process's own (torch's import alone is
    about 500 MB, which is why the bound is on the growth)."""
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(_safetensors_bytes({"net": "net1", "hparams": {"l1_oc": 100000}}, {"w": ("F32", [1])}))
    assert hostile.stat().st_size == 1024
    big = tmp_path / "big.safetensors"
    big.write_bytes(_safetensors_bytes({"net": "net4", "hparams": {"l1_oc": 1024, "filter_multiplier": 16}},
                                       {"w": ("F32", [1])}))
    out = str(tmp_path / "run")
    cases = [
        ["eval", str(hostile), "--data", "synthetic:20"],
        ["eval", str(big), "--data", "synthetic:20"],
        ["train", "net1", "--set", "l1_oc=100000", "--data", "synthetic:20", "--out", out],
        ["train", "net4", "--set", "l1_oc=1024", "--set", "filter_multiplier=16", "--data", "synthetic:20",
         "--out", out],
        ["train", "net1", "--set", "filter_multiplier=nan", "--data", "synthetic:20", "--out", out],
        ["train", "net1", "--lr", "nan", "--data", "synthetic:20", "--out", out],
        ["sweep", "net1", "--grid", "l1_oc=100000", "--data", "synthetic:20", "--out", out],
    ]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cases)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for r in json.loads(proc.stdout):
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
        assert r["peak_mb"] - r["base_mb"] < 100, r
        assert r["seconds"] < 5, r
        print(f"{' '.join(r['argv'][:4])}: peak {r['peak_mb']:.0f} MB (+{r['peak_mb'] - r['base_mb']:.0f} MB over "
              f"the process's {r['base_mb']:.0f} MB), {r['seconds']:.2f} s")
    assert not Path(out).exists()


# ------------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def file_size_limit():
    """Set a file-size limit on this process for the test: writes past it fail with EFBIG, as on a full disk
    (SIGXFSZ ignored, so the write returns the error instead of killing the process); both restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.getsignal(signal.SIGXFSZ)

    def apply(limit: int) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    yield apply
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("limit,failing,changed", [
    (64 * 1024, "best.safetensors", set()),  # checkpoints are ~185 KB: the first checkpoint write fails
    # the weights (185 KB) fit, the state (weights + momentum, ~375 KB) does not: the state stays the old one
    # (the manifest logs the two checkpoints that were written)
    (256 * 1024, "last.state.pt", {"best.safetensors", "last.safetensors", ".cifarbench-outputs.jsonl"}),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_old_files(base_run, tmp_path, capsys, file_size_limit,
                                                                       limit, failing, changed):
    run = _copy(base_run, tmp_path / "run")
    before = _snapshot(run)
    file_size_limit(limit)
    line = assert_user_error(capsys, "train", "net1", "--resume", run, "--epochs", "3", match="cannot write")
    assert f"cannot write {run / failing}: File too large" in line
    after = _snapshot(run)
    assert set(after) == set(before)  # no temporary left behind
    for name in before:
        if name not in changed:
            assert after[name] == before[name], name
