"""Safe outputs (issue 12): no command writes over a file it did not make, occlusion outputs never land on an
input, --out mistakes are one error line before any work, writes are durable and share one mode, temporaries
never outlive their process (normal exit, SIGTERM, or swept after kill -9)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli
from PIL import Image

from cifarbench.io import MANIFEST, atomic_path, scratch_dir, write_json, write_text

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FAST = ("--k", "16", "--stride", "16")  # a 2x2 map: four patches per image


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _naive_map(image_path: Path, k: int = 16, stride: int = 16) -> np.ndarray:
    """The occlusion map by its definition: gray KxK patch at each (i*s, j*s), softmax of the clean prediction."""
    from cifarbench import load_model

    net = load_model("net1").eval()
    x = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        target = int(net(x[None]).argmax())
        n = (32 - k) // stride + 1
        out = np.zeros((n, n), np.float32)
        for i in range(n):
            for j in range(n):
                y = x.clone()
                y[:, i * stride:i * stride + k, j * stride:j * stride + k] = 0.5
                out[i, j] = torch.softmax(net(y[None]), 1)[0, target]
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ occlude names
def test_occlude_into_the_folder_of_its_input_leaves_the_input_unchanged(tmp_path, capsys, monkeypatch):
    shutil.copy(EXAMPLES / "cat.png", tmp_path / "cat.png")
    before = _bytes(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "occlude", *FAST, "cat.png", "--out", ".")  # the exact command
    assert code == 0, err
    assert _bytes(tmp_path / "cat.png") == before
    assert (tmp_path / "cat_occlusion.png").stat().st_size > 1000
    assert np.allclose(np.load(tmp_path / "cat_k16.npy"), _naive_map(EXAMPLES / "cat.png"), atol=1e-5)


def test_an_output_name_that_is_another_input_gets_a_distinct_name(tmp_path, capsys):
    # x.png's figure would be x_occlusion.png, which here is an input image itself
    shutil.copy(EXAMPLES / "cat.png", tmp_path / "x.png")
    shutil.copy(EXAMPLES / "ship.png", tmp_path / "x_occlusion.png")
    inputs = {p: _bytes(p) for p in (tmp_path / "x.png", tmp_path / "x_occlusion.png")}
    code, out, err = run_cli(capsys, "occlude", *FAST, tmp_path / "x.png", tmp_path / "x_occlusion.png",
                             "--out", tmp_path, "--json")
    assert code == 0, err
    assert {p: _bytes(p) for p in inputs} == inputs
    results = json.loads(out)["results"]
    files = [f for r in results for f in r["files"]]
    assert len(results) == 2 and len(set(files)) == len(files) == 6
    assert not {str(p) for p in inputs} & set(files)


def test_two_inputs_with_one_stem_give_two_result_sets(tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copy(EXAMPLES / "cat.png", tmp_path / "a" / "x.png")
    shutil.copy(EXAMPLES / "ship.png", tmp_path / "b" / "x.png")
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "occlude", *FAST, tmp_path / "a" / "x.png", tmp_path / "b" / "x.png",
                             "--out", out_dir, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    npys = [Path(f) for r in results for f in r["files"] if f.endswith(".npy")]
    assert len(set(npys)) == 2 and len(list(out_dir.glob("*.npy"))) == 2 and len(list(out_dir.glob("*.png"))) == 2
    # each map file holds its own image's map, by the definition
    assert np.allclose(np.load(npys[0]), _naive_map(EXAMPLES / "cat.png"), atol=1e-5)
    assert np.allclose(np.load(npys[1]), _naive_map(EXAMPLES / "ship.png"), atol=1e-5)


def test_one_image_given_twice_gives_one_result(tmp_path, capsys):
    shutil.copy(EXAMPLES / "dog.png", tmp_path / "dog.png")
    (tmp_path / "sub").mkdir()
    os.link(tmp_path / "dog.png", tmp_path / "sub" / "hard.png")  # the same file by a third name
    code, out, err = run_cli(capsys, "occlude", *FAST, tmp_path / "dog.png", tmp_path / "sub" / ".." / "dog.png",
                             tmp_path / "sub" / "hard.png", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == \
        ["dog_k16.csv", "dog_k16.npy", "dog_occlusion.png", "index.html"]


# ------------------------------------------------------------------------------------------- no overwrites
def test_a_user_file_under_an_output_name_is_never_replaced_but_a_rerun_is(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mine = out_dir / "cat_k16.csv"
    mine.write_text("my own notes\n")
    line = assert_user_error(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", out_dir,
                             match="cat_k16.csv")
    assert "--out" in line
    assert mine.read_text() == "my own notes\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["cat_k16.csv"]  # refused before any work or write
    # the same command twice into one folder: the second run replaces its own previous outputs
    fresh = tmp_path / "fresh"
    for _ in range(2):
        code, _, err = run_cli(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", fresh)
        assert code == 0, err
    # a previous output the user has since edited is theirs now: refused, bytes kept
    (fresh / "cat_k16.csv").write_text("edited\n")
    assert_user_error(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", fresh, match="cat_k16.csv")
    assert (fresh / "cat_k16.csv").read_text() == "edited\n"


def test_eval_and_export_refuse_to_replace_a_user_file(tmp_path, capsys):
    (tmp_path / "eval.json").write_text("{}")
    assert_user_error(capsys, "eval", "net1", "--data", "synthetic:20", "--out", tmp_path, match="eval.json")
    assert (tmp_path / "eval.json").read_text() == "{}"
    target = tmp_path / "net1.onnx"
    target.write_bytes(b"not ours")
    assert_user_error(capsys, "export", "net1", "--out", target, match="net1.onnx")
    assert target.read_bytes() == b"not ours"


def test_train_refuses_to_replace_a_user_file_and_guards_what_it_writes(tmp_path, capsys):
    """A run's --out is guarded like every other command's: a user's file named like a run file stops it before
    training; a clean run logs its files in the manifest; --resume continues in place and logs what it writes."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.csv").write_text("my numbers\n")
    args = ("train", "net1", "--data", "synthetic:64", "--epochs", "1", "--batch-size", "32")
    assert_user_error(capsys, *args, "--out", tmp_path / "mine", match="metrics.csv")
    assert (tmp_path / "mine" / "metrics.csv").read_text() == "my numbers\n"
    assert not (tmp_path / "mine" / "config.json").exists()  # refused before anything was written
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *args, "--out", run)
    assert code == 0, err
    manifest = (run / MANIFEST).read_text()
    assert all(name in manifest for name in ("config.json", "metrics.csv", "best.safetensors", "results.json"))
    (run / MANIFEST).unlink()  # a run from before manifests: resuming it adopts its files
    code, _, err = run_cli(capsys, "train", "net1", "--resume", run, "--epochs", "2")
    assert code == 0, err
    logged = {json.loads(line)["name"] for line in (run / MANIFEST).read_text().splitlines()}
    assert {"metrics.csv", "last.safetensors", "results.json"} <= logged
    (run / "config.json").unlink()  # what the resumed run wrote is cifarbench's: a new run may replace it
    code, _, err = run_cli(capsys, *args, "--out", run)
    assert code == 0, err


# ----------------------------------------------------------------------------------------- --out mistakes
def test_out_on_or_under_a_regular_file_is_one_error_line(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert_user_error(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", out, match=str(f))
        assert_user_error(capsys, "eval", "net1", "--data", "synthetic:20", "--out", out, match=str(f))
    assert_user_error(capsys, "export", "net1", "--out", f / "net1.onnx", match=str(f))
    assert_user_error(capsys, "bench", "net1", "--out", f / "run.json", match=str(f))
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_one_error_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_user_error(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", ro / "maps", match="writable")
        assert_user_error(capsys, "occlude", *FAST, EXAMPLES / "cat.png", "--out", ro, match="writable")
    finally:
        ro.chmod(0o755)


def test_a_file_system_error_is_one_line_naming_the_path(tmp_path, capsys):
    """Whatever writes, an OSError reaches the user as ``error: PATH: reason`` (cli.main, one place)."""
    from cifarbench.cli import app

    f = tmp_path / "file.txt"
    f.write_text("x")

    @app.command("_test_write_under_file", hidden=True)
    def _write() -> None:
        write_text(f / "result.csv", "1\n")

    try:
        line = assert_user_error(capsys, "_test_write_under_file")
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "_test_write_under_file"]
    assert str(f) in line and "Not a directory" in line and ".tmp" not in line


# ---------------------------------------------------------------------------------------------- durability
def test_checkpoints_and_results_get_one_mode(tmp_path):
    from cifarbench.checkpoint import save_checkpoint, save_state
    from cifarbench.zoo import create_model

    model = create_model("net1")
    save_checkpoint(tmp_path / "w.safetensors", model, {"net": "net1", "hparams": model.hparams})
    save_state(tmp_path / "s.pt", {"epoch": 1})
    write_json(tmp_path / "r.json", {"a": 1})
    with open(tmp_path / "plain.txt", "w") as f:  # what any program's plain open() gives under this umask
        f.write("x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_stale_temporaries_are_swept_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".x.csv.{dead}.0123456789ab.tmp"
    live = tmp_path / f".x.csv.{os.getpid()}.0123456789ab.tmp"
    user = tmp_path / ".notes.1.tmp"  # not the shape of ours
    for p in (stale, live, user):
        p.write_text("t")
    scratch_old = tmp_path / f"int8-{dead}.abcd1234"
    scratch_old.mkdir()
    (scratch_old / "big.onnx").write_bytes(b"x" * 1000)
    write_text(tmp_path / "x.csv", "1\n")
    assert not stale.exists() and live.exists() and user.exists()
    with scratch_dir(tmp_path, "int8-") as scratch:
        assert not scratch_old.exists() and scratch.is_dir() and str(os.getpid()) in scratch.name
        (scratch / "f").write_text("y")
    assert not scratch.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


_BLOCKING_COMMAND = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cifarbench import cli
    from cifarbench.io import atomic_path, scratch_dir

    out = Path(sys.argv[1])

    @cli.app.command("block")
    def block() -> None:
        with scratch_dir(out, "scratch-") as s, atomic_path(out / "result.bin") as tmp:
            (s / "part").write_bytes(b"x" * 4096)
            tmp.write_bytes(b"y" * 4096)
            print("writing", flush=True)
            time.sleep(60)

    cli.main(["block"])
""")


def _start_blocking(tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_COMMAND, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


def test_sigterm_mid_write_removes_every_temporary(tmp_path):
    proc = _start_blocking(tmp_path)
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # mid-write: the temporaries exist
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    # one line, and the shell's code for "ended by SIGTERM" (128 + 15)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines() == ["error: interrupted"], err
    assert list(tmp_path.iterdir()) == []  # no temp file, no scratch folder, no half result


def test_kill_9_leftovers_are_swept_by_the_next_write(tmp_path):
    proc = _start_blocking(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2, left  # what a kill -9 leaves: the temp file and the scratch folder
    write_text(tmp_path / "next.csv", "1\n")
    with scratch_dir(tmp_path, "scratch-"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.csv"]


def test_dataset_occlusion_checks_its_names_and_occludes_a_repeated_index_once(tmp_path, capsys):
    mine = tmp_path / "synthetic-test-00003_k16.npy"
    mine.write_bytes(b"mine")
    assert_user_error(capsys, "occlude", *FAST, "--data", "synthetic", "--indices", "2,3", "--out", tmp_path,
                      match=mine.name)
    assert mine.read_bytes() == b"mine" and len(list(tmp_path.iterdir())) == 1
    code, out, err = run_cli(capsys, "occlude", *FAST, "--data", "synthetic", "--indices", "2,2", "--out",
                             tmp_path / "o", "--json", "--no-figures")
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls")
def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path):
    log = tmp_path / "trace.txt"
    target = tmp_path / "out" / "r.json"
    script = f"from cifarbench.io import write_json; write_json({str(target)!r}, {{'a': 1}})"
    traced = "trace=openat,fsync,fdatasync,rename,renameat,renameat2"
    subprocess.run(["strace", "-f", "--seccomp-bpf", "-e", traced, "-o", str(log), sys.executable, "-c", script],
                   check=True, cwd=REPO)
    calls = [line.split(None, 1)[1] for line in log.read_text().splitlines() if str(target.parent) in line
             or "fsync(" in line]
    rename = next(i for i, c in enumerate(calls) if c.startswith("rename"))
    written = [i for i, c in enumerate(calls[:rename]) if c.startswith("openat") and ".r.json." in c]
    assert written and any(c.startswith(("fsync(", "fdatasync(")) for c in calls[written[0]:rename]), calls
    assert any(c.startswith("fsync(") for c in calls[rename:]), calls  # and the folder after it
    assert json.loads(target.read_text()) == {"a": 1}
