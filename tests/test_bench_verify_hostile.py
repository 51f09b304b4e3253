"""``bench`` and ``verify`` under hostile and degenerate input: comparisons that check nothing, non-finite
tolerances and logits, sources a backend cannot run, huge batches, damaged saved runs, ambiguous comparisons, and
what the tables say. Each expectation is a definition or a hand-computed value, never cifarbench's own output."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from cli_helpers import assert_user_error, run_cli

FORMAT = "cifarbench-bench/1"
FAST = ("--iters", "1", "--warmup", "0", "--device", "cpu")


class Tiny(nn.Module):
    """3x32x32 -> 10 logits, a few thousand parameters: opening and running it costs milliseconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)  # the one layer int8 quantizes (first conv and head stay fp32)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A TorchScript file, a fixed-batch-1 ONNX file, a dynamic-batch ONNX file and a TorchScript whose logits
    are NaN (a NaN bias)."""
    root = tmp_path_factory.mktemp("models")
    model = tiny()
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 3, 32, 32)), str(root / "tiny.ts"))
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(root / "fixed.onnx"), dynamo=False,
                      input_names=["x"])
    torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(root / "dyn.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    nan = tiny()
    with torch.no_grad():
        nan.fc.bias[3] = float("nan")
    torch.jit.save(torch.jit.trace(nan, torch.rand(2, 3, 32, 32)), str(root / "nan.ts"))
    return root


def run_row(**fields) -> dict:
    row = {"backend": "torch", "precision": "fp32", "device": "cpu", "batch": 1, "iters": 5,
           "images_per_s": 100.0, "latency_ms": {"mean": 10.0, "p50": 10.0, "p90": 11.0, "p99": 12.0, "min": 9.0},
           "gflops": None}
    row.update(fields)
    return row


def run_doc(net: str = "tiny", digest: str | None = "a" * 64, rows=None) -> dict:
    return {"format": FORMAT, "net": net, "model": {"name": net, "digest": digest}, "date": "2026-12-01",
            "machine": {"cpu": "Test CPU", "cores": 2}, "results": rows if rows is not None else [run_row()]}


def write(tmp_path, name: str, doc) -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# ------------------------------------------------------------------ 1. comparisons that compare nothing

def test_verify_int8_onnx_against_itself_is_nothing_to_compare(capsys, models):
    """An int8 ONNX file: the reference (ONNX Runtime on the file) and the onnx-int8 row are one session of one
    file, so the row would compare the reference with itself."""
    from cifarbench.artifacts import open_runtime

    int8 = open_runtime(str(models / "dyn.onnx"), "onnx-int8", device="cpu", calib=16,
                        calib_data="synthetic:64").onnx_path()
    assert_user_error(capsys, "verify", int8, "--data", "synthetic:64", "--images", "8",
                      match="nothing to compare")
    assert_user_error(capsys, "verify", int8, "--backends", "onnxruntime,onnx-int8", "--data", "synthetic:64",
                      "--images", "8", match="nothing to compare")


def _aoti_package_source(tmp_path):
    """An AOTInductor package's source as resolve_source makes it (kind ``aoti``, no module), without compiling
    one: nothing below runs it."""
    from cifarbench.source import source_from_contract

    return source_from_contract("aoti", "pkg", input_size=32, num_classes=10, path=tmp_path / "pkg.pt2",
                                digest="0" * 64)


@pytest.mark.parametrize("reference", [None, "aoti"])
def test_verify_aoti_package_has_nothing_to_compare(tmp_path, reference):
    """A package runs only on aoti: with aoti as the reference nothing is left, and zero comparisons never pass."""
    from cifarbench.commands.verify import run_verify
    from cifarbench.errors import UserError

    with pytest.raises(UserError, match="nothing to compare"):
        run_verify(_aoti_package_source(tmp_path), None, reference, None, None, None, "synthetic:64", None, 8, 16,
                   "cpu")


def test_default_backends_of_an_aoti_package_are_aoti(tmp_path):
    """bench's defaults (torch where there is a module, and auto) for a package: aoti, never onnxruntime."""
    from cifarbench.commands.verify import backends_for, concrete, default_reference
    from cifarbench.parity import BackendSpec

    source = _aoti_package_source(tmp_path)
    cpu = torch.device("cpu")
    assert backends_for(source, cpu) == ["aoti"]
    assert concrete(source, [BackendSpec("auto", "fp32")], cpu, "--backends") == [BackendSpec("aoti", "fp32")]
    assert default_reference(source) == BackendSpec("aoti", "fp32")


# ------------------------------------------------------------------ 2. tolerances and NaN

@pytest.mark.parametrize("option, value", [("--atol", "nan"), ("--rtol", "nan"), ("--atol", "inf"),
                                           ("--rtol", "inf"), ("--atol", "-1"), ("--top1", "nan")])
def test_non_finite_or_negative_tolerance_is_refused(capsys, option, value):
    assert_user_error(capsys, "verify", "net1", option, value, "--data", "synthetic:64", match=option)


def test_judge_by_definition():
    """|out - ref| <= atol + rtol * |ref| for every logit, computed by hand; a NaN on either side always fails."""
    from cifarbench.commands.verify import judge

    ref = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    out = ref + torch.tensor([[1.5e-4, 0.0], [0.0, 0.0]])
    tol = {"atol": 1e-4, "rtol": 0.0, "top1": 0.99}
    failures, bad = judge(ref, out, tol)
    assert bad == 1 and len(failures) == 1          # 1.5e-4 > 1e-4
    failures, bad = judge(ref, out, {**tol, "rtol": 1e-4})
    assert bad == 0 and failures == []              # 1.5e-4 <= 1e-4 + 1e-4 * 1.0
    for a, b in ((ref, torch.full_like(ref, float("nan"))), (torch.full_like(ref, float("nan")), ref),
                 (torch.full_like(ref, float("nan")), torch.full_like(ref, float("nan")))):
        failures, bad = judge(a, b, {"atol": 1e9, "rtol": 1e9, "top1": 0.0})
        assert bad == 4 and any("NaN" in f for f in failures)
    swapped = torch.tensor([[2.0, 1.0], [3.0, -4.0]])  # top-1 of row 0 flips: agreement 1/2
    failures, _ = judge(ref, swapped, {"atol": 10.0, "rtol": 0.0, "top1": 0.99})
    assert failures == ["top-1 50.00% < 99.00%"]


def test_nan_logits_fail_verify(capsys, models):
    """A model whose logits hold NaN, reference and backend alike: every comparison with NaN is False, which
    must fail, never pass."""
    code, out, err = run_cli(capsys, "verify", models / "nan.ts", "--backends", "onnxruntime", "--data",
                             "synthetic:64", "--images", "8", "--json")
    report = json.loads(out)
    assert code == 1, err
    assert not report["passed"] and not report["results"][0]["passed"]
    assert report["results"][0]["out_of_tolerance"] == 8  # one NaN logit per image


# ------------------------------------------------------------------ 3./4. sources a backend cannot run, sizes

def test_verify_torchscript_defaults_leave_out_compiling_backends(capsys, models):
    code, out, err = run_cli(capsys, "verify", models / "tiny.ts", "--data", "synthetic:64", "--images", "8",
                             "--calib", "16", "--json")
    assert code == 0, err
    backends = {r["backend"] for r in json.loads(out)["results"]}
    assert "onnxruntime" in backends and not backends & {"torch-compile", "aoti"}


@pytest.mark.parametrize("command, backend", [("bench", "torch-compile"), ("verify", "torch-compile"),
                                              ("bench", "aoti"), ("verify", "aoti")])
def test_torchscript_on_a_compiling_backend_is_one_line(capsys, models, command, backend):
    extra = FAST if command == "bench" else ("--data", "synthetic:64", "--images", "8")
    line = assert_user_error(capsys, command, models / "tiny.ts", "--backends", backend, *extra,
                             match="TorchScript")
    assert f"--backends {backend}" in line


def test_compiled_runtime_refuses_torchscript(models):
    from cifarbench.errors import UserError
    from cifarbench.runtime.torch_compile import CompiledRuntime

    with pytest.raises(UserError, match="TorchScript"):
        CompiledRuntime(str(models / "tiny.ts"))


def test_bench_batch_beyond_memory_is_refused_before_allocating(capsys, models):
    # 1e8 x 3 x 32 x 32 float32 = 1.2288e12 bytes: no machine this runs on has twice that available
    line = assert_user_error(capsys, "bench", models / "tiny.ts", "--batch", "100000000", "--backends", "torch",
                             *FAST, match="--batch 100000000")
    assert "1.23 TB" in line


@pytest.mark.parametrize("value", ["nan", "-5", "inf"])
def test_bench_min_seconds_must_be_finite_and_non_negative(capsys, models, value):
    assert_user_error(capsys, "bench", models / "tiny.ts", "--min-seconds", value, "--backends", "torch",
                      match="--min-seconds")


def test_aoti_export_keeps_the_programs_own_batch_range(tmp_path, monkeypatch):
    """A torch.export program with batch Dim in 1..1024: re-exporting it with 1..4096 violates its constraints.
    The package takes the program's own range (the compile itself is stubbed: only torch.export runs)."""
    from cifarbench.export import aoti
    from cifarbench.source import resolve_source

    program = torch.export.export(tiny(), (torch.rand(4, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},))
    seen = {}

    def compile_stub(program, package_path, inductor_configs):
        seen["meta"] = inductor_configs["aot_inductor.metadata"]
        seen["ranges"] = [(int(r.lower), int(r.upper)) for r in program.range_constraints.values()]
        open(package_path, "wb").close()

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    aoti.export_aoti(resolve_source(program), tmp_path / "p.pt2")
    assert seen["meta"]["cifarbench.max_batch"] == "1024" and seen["ranges"] == [(1, 1024)]


# ------------------------------------------------------------------ 3c. damaged saved runs

@pytest.mark.parametrize("doc, match", [
    ({"format": FORMAT, "results": [{"backend": "torch"}]}, '"net"'),
    ({"format": FORMAT, "results": []}, '"net"'),
    ({"format": FORMAT, "net": "x", "results": []}, "empty"),
    ({"format": FORMAT, "net": "x", "results": [{"backend": "torch"}]}, "results[0]"),
    (run_doc(rows=[run_row(images_per_s="fast")]), "images_per_s"),
    (run_doc(rows=[run_row(latency_ms={"p50": 1.0})]), "latency_ms.p90"),
    (run_doc(rows=[run_row(batch=0)]), "batch"),
])
def test_incomplete_bench_doc_is_one_line(capsys, tmp_path, doc, match):
    assert_user_error(capsys, "bench", "--from", write(tmp_path, "run.json", doc), match=match)


def _pytest_doc(*benchmarks) -> dict:
    return {"machine_info": {"node": "box", "cpu": {"brand_raw": "CPU", "count": 2}}, "benchmarks": list(benchmarks),
            "datetime": "2026-12-01T10:00:00"}


def _bench(name: str, mean: float = 0.5, **extra) -> dict:
    return {"group": "g", "name": name, "fullname": f"b.py::{name}", "stats": {"mean": mean}, "extra_info": extra}


@pytest.mark.parametrize("extra, match", [({"images_per_s": "fast"}, "images_per_s"), ({"gflops": [1]}, "gflops"),
                                          ({"batch": "64"}, "batch"), ({"precision": 8}, "precision")])
def test_pytest_benchmark_field_of_the_wrong_type_is_one_line(capsys, tmp_path, extra, match):
    line = assert_user_error(capsys, "bench", "--from", write(tmp_path, "pb.json", _pytest_doc(_bench("t", **extra))),
                             match=match)
    assert "'t'" in line


# ------------------------------------------------------------------ 5. comparisons

def test_cpu_run_compares_with_gpu_run_of_the_same_model(capsys, tmp_path):
    """README's headline: ``bench --from cpu.json --compare gpu.json`` pairs rows across devices."""
    cpu = run_doc(rows=[run_row(batch=64, images_per_s=1000.0), run_row(batch=1, images_per_s=100.0)])
    gpu = run_doc(rows=[run_row(batch=64, device="cuda:0", images_per_s=8000.0,
                                latency_ms={"mean": 8.0, "p50": 8.0, "p90": 9.0, "p99": 9.5}),
                        run_row(batch=625, device="cuda:0")])
    code, out, err = run_cli(capsys, "bench", "--from", write(tmp_path, "cpu.json", cpu), "--compare",
                             write(tmp_path, "gpu.json", gpu), "--json")
    assert code == 0, err
    doc = json.loads(out)
    (row,) = doc["rows"]
    assert (row["batch"], row["device"], row["other_device"]) == (64, "cpu", "cuda:0")
    assert row["speedup"] == pytest.approx(8000 / 1000) and row["p50_ratio"] == pytest.approx(8.0 / 10.0)
    # the rows with no partner are said, not dropped silently
    assert len(doc["unpaired"]["base"]) == 1 and "batch 1" in doc["unpaired"]["base"][0]
    assert len(doc["unpaired"]["other"]) == 1 and "batch 625" in doc["unpaired"]["other"][0]
    code, _, err = run_cli(capsys, "bench", "--from", tmp_path / "cpu.json", "--compare", tmp_path / "gpu.json")
    assert code == 0 and "not compared" in err and "batch 625" in err


def test_compare_of_two_models_is_refused_unless_allowed(capsys, tmp_path):
    a = write(tmp_path, "a.json", run_doc("net1", "a" * 64))
    b = write(tmp_path, "b.json", run_doc("net4", "b" * 64, rows=[run_row(images_per_s=50.0)]))
    assert_user_error(capsys, "bench", "--from", a, "--compare", b, match="different models")
    same_name = write(tmp_path, "c.json", run_doc("net1", "c" * 64))  # same name, other weights
    assert_user_error(capsys, "bench", "--from", a, "--compare", same_name, match="different models")
    code, out, err = run_cli(capsys, "bench", "--from", a, "--compare", b, "--allow-different-models", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["same_model"] is False and doc["rows"][0]["speedup"] == pytest.approx(0.5)
    code, table, _ = run_cli(capsys, "bench", "--from", a, "--compare", b, "--allow-different-models")
    assert code == 0 and "DIFFERENT MODELS" in table


def test_compare_refuses_duplicate_rows(capsys, tmp_path):
    dup = write(tmp_path, "dup.json", run_doc(rows=[run_row(), run_row(images_per_s=200.0)]))
    one = write(tmp_path, "one.json", run_doc())
    assert_user_error(capsys, "bench", "--from", one, "--compare", dup, match="two rows")
    pb_dup = write(tmp_path, "pb_dup.json", _pytest_doc(_bench("t", 0.5), _bench("t", 0.25)))
    pb_one = write(tmp_path, "pb_one.json", _pytest_doc(_bench("t", 0.5)))
    assert_user_error(capsys, "bench", "--from", pb_one, "--compare", pb_dup, match="more than once")


def test_bench_measures_each_backend_and_batch_once(capsys, models):
    code, out, err = run_cli(capsys, "bench", models / "dyn.onnx", "--backends", "onnxruntime,onnxruntime,auto",
                             "--batch", "2,2", *FAST, "--json")
    assert code == 0, err
    assert [(r["backend"], r["batch"]) for r in json.loads(out)["results"]] == [("onnxruntime", 2)]


def test_bench_says_when_two_backends_are_one_runtime(capsys, models):
    """An int8 file on onnxruntime and on onnx-int8 is one session: measured once, and said, not dropped."""
    from cifarbench.artifacts import open_runtime

    int8 = open_runtime(str(models / "dyn.onnx"), "onnx-int8", device="cpu", calib=16,
                        calib_data="synthetic:64").onnx_path()
    code, out, err = run_cli(capsys, "bench", int8, "--backends", "onnxruntime,onnx-int8", "--batch", "2", *FAST,
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["results"]) == 1 and doc["skipped"] == [{"backend": "onnx-int8:int8", "same_as": "onnxruntime:fp32"}]
    assert "measured once" in err


# ------------------------------------------------------------------ 6. messages and help

@pytest.mark.parametrize("command", ["bench", "verify"])
def test_help_examples_name_known_backends(command):
    import click
    import typer

    from cifarbench.cli import app
    from cifarbench.runtime import BACKENDS

    group = typer.main.get_command(app)
    text = group.get_command(click.Context(group), command).help
    lists = re.findall(r"--backends ([\w:,-]+)", text)
    assert lists, text
    for item in ",".join(lists).split(","):
        assert item.partition(":")[0] in BACKENDS, item


def test_backend_errors_name_the_backends_option(capsys, models):
    line = assert_user_error(capsys, "bench", models / "dyn.onnx", "--backends", "torch", *FAST,
                             match="--backends")
    assert not re.search(r"--backend(?![s\w-])", line)


def test_open_backend_rewrites_backend_option(monkeypatch):
    from cifarbench import artifacts
    from cifarbench.commands.verify import open_backend
    from cifarbench.errors import UserError
    from cifarbench.parity import BackendSpec

    def refuse(*args, **kwargs):
        raise UserError("cannot compile m: bad op; use --backend torch or onnxruntime")

    monkeypatch.setattr(artifacts, "open_runtime", refuse)
    with pytest.raises(UserError, match=r"use --backends torch or onnxruntime$"):
        open_backend(None, BackendSpec("aoti", "fp32"), "cpu")


# ------------------------------------------------------------------ 7. what the numbers say

def test_fixed_batch_model_says_it_ran_calls_of_its_batch(capsys, models):
    code, out, err = run_cli(capsys, "bench", models / "fixed.onnx", "--batch", "4,3", *FAST, "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [(r["batch"], r["calls"], r["model_batch"]) for r in rows] == [(4, 4, 1), (3, 3, 1)]


def test_table_shows_the_mean_images_per_s_is_computed_from(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    # batch 4, mean 20 ms: 4 / 0.020 = 200 images/s; the median (10 ms) would say 400
    doc = run_doc(rows=[run_row(batch=4, images_per_s=200.0, calls=4, model_batch=1,
                                latency_ms={"mean": 20.0, "p50": 10.0, "p90": 30.0, "p99": 50.0})])
    code, table, _ = run_cli(capsys, "bench", "--from", write(tmp_path, "run.json", doc))
    assert code == 0
    header = next(line for line in table.splitlines() if "images/s" in line)
    assert "mean ms" in header and "batch / mean" in table
    row = next(line for line in table.splitlines() if "torch" in line)
    assert "200" in row and "20.00" in row and "4 calls of 1" in row
