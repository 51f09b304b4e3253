"""Sweeps, the library: grid parsing and naming, the report's grouped means, resume after a kill mid-sweep."""
import math

import pytest

from cifarbench.errors import UserError
from cifarbench.sweep import (claim, default_grid, expand, grid_of, grouped_means, groupings, normalize_grid,
                              parse_grid, plan, point_name, run_sweep, summarize, sweep_rows)

DATA = "synthetic:200"
TIMING = ("epoch_duration", "run_duration")


def test_grid_is_parsed_typed_and_expanded_in_report_order():
    raw = parse_grid(["lr=0.01, 0.001", "batch_size=128,256,512", "filter_multiplier=2"])
    assert raw == {"lr": ["0.01", "0.001"], "batch_size": ["128", "256", "512"], "filter_multiplier": ["2"]}
    grid = normalize_grid("net1", raw)
    assert grid == {"lr": [0.01, 0.001], "batch_size": [128, 256, 512], "filter_multiplier": [2.0]}
    points = expand(grid)
    assert len(points) == 6 and points[0] == {"lr": 0.01, "batch_size": 128, "filter_multiplier": 2.0}
    assert [p["batch_size"] for p in points[:3]] == [128, 256, 512]  # first key varies slowest
    assert point_name(points[0]) == "lr=0.01,batch_size=128,filter_multiplier=2.0"
    # the same setting spelled differently names the same run folder
    assert point_name(expand(normalize_grid("net1", parse_grid(["filter_multiplier=2.00"])))[0]) == \
        "filter_multiplier=2.0"
    assert groupings(grid) == [("lr",), ("batch_size",), ("lr", "batch_size"), ("epoch",)]


def test_default_grid_is_the_reports(tmp_path):
    assert default_grid("net1") == {"l1_oc": [6, 12, 18], "filter_multiplier": [1.5, 2.0], "kernel_size": [3, 5],
                                    "stride": [1, 2]}
    assert default_grid("net3") == {"l1_oc": [32, 64, 96], "dropout": [0.1, 0.3, 0.5]}
    trials = plan("net1", default_grid("net1"), tmp_path / "s")
    assert not (tmp_path / "s").exists()  # planning writes nothing
    assert len(trials) == 24 and trials[0].config.resolved()["epochs"] == 30
    assert len({t.out for t in trials}) == 24
    assert trials[23].config.hparams == {"l1_oc": 18, "filter_multiplier": 2.0, "kernel_size": 5, "stride": 2}


@pytest.mark.parametrize("items, match", [
    (["depth=1,2"], "unknown key 'depth'"),
    (["lr"], "expected key=v1,v2"),
    (["=0.1"], "expected key=v1,v2"),
    (["lr="], "empty value"),
    (["lr=0.1,,0.2"], "empty value"),
    (["lr=0.1", "lr=0.2"], "given twice"),
])
def test_bad_grid_text_is_a_user_error(items, match):
    with pytest.raises(UserError, match=match):
        parse_grid(items)


@pytest.mark.parametrize("grid, match", [
    ({}, "empty grid"),
    ({"batch_size": ["abc"]}, "not a valid int"),
    ({"lr": ["-1"]}, "must be positive"),
    ({"lr": ["nan"]}, "must be positive"),
    ({"l1_oc": ["6", "6.0"]}, "not a valid int"),
    ({"l1_oc": ["6", "06"]}, "repeats a value"),
    ({"dropout": ["0.5"]}, "no dropout layers"),
])
def test_bad_grid_values_are_user_errors(grid, match):
    with pytest.raises(UserError, match=match):
        normalize_grid("net1", grid)


def test_grouped_means_equal_a_hand_computation():
    def row(run, lr, bs, epoch, loss, train, test):
        return {"run": str(run), "lr": lr, "batch_size": bs, "epoch": epoch, "loss": loss, "train_accuracy": train,
                "test_accuracy": test, "overfit%": 100 * (train - test), "total_parameters": 1000 * bs}

    rows = [row(0, 0.1, 8, 1, 2.0, 0.2, 0.1), row(0, 0.1, 8, 2, 1.0, 0.6, 0.3),
            row(1, 0.1, 16, 1, 3.0, 0.3, 0.2), row(1, 0.1, 16, 2, 2.0, 0.5, 0.4),
            row(2, 0.01, 8, 1, 4.0, 0.1, 0.5), row(2, 0.01, 8, 2, 2.0, 0.3, 0.1)]
    by_lr = grouped_means(rows, ("lr",))
    # lr 0.01: run 2's two epochs; lr 0.1: four rows of runs 0 and 1
    assert [r["lr"] for r in by_lr] == [0.01, 0.1]
    assert by_lr[0] == pytest.approx({"lr": 0.01, "runs": 1, "loss": 3.0, "train_accuracy": 0.2,
                                      "test_accuracy": 0.3, "overfit%": -10.0, "total_parameters": 8000})
    assert by_lr[1] == pytest.approx({"lr": 0.1, "runs": 2, "loss": 2.0, "train_accuracy": 0.4,
                                      "test_accuracy": 0.25, "overfit%": 15.0, "total_parameters": 12000})
    pairs = grouped_means(rows, ("lr", "batch_size"))
    assert [(r["lr"], r["batch_size"], r["runs"]) for r in pairs] == [(0.01, 8, 1), (0.1, 8, 1), (0.1, 16, 1)]
    assert [r["loss"] for r in pairs] == pytest.approx([3.0, 1.5, 2.5])
    assert [r["test_accuracy"] for r in pairs] == pytest.approx([0.3, 0.2, 0.3])
    by_epoch = grouped_means(rows, ("epoch",))
    assert [r["loss"] for r in by_epoch] == pytest.approx([3.0, 5 / 3])
    assert [r["train_accuracy"] for r in by_epoch] == pytest.approx([0.2, 1.4 / 3])


class Killed(Exception):
    pass


def _grid():
    return {"lr": [0.05, 0.02, 0.01], "l1_oc": [3]}


def _plan(out, resume=False):
    trials = plan("net1", _grid(), out, epochs=2, data=DATA, seed=1)
    claim(trials, resume=resume)
    return trials


def _table(trials, results):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in sweep_rows(trials, results)]


def test_a_sweep_killed_mid_way_resumes_without_redoing_finished_runs(tmp_path):
    trials = _plan(tmp_path / "straight")
    straight = run_sweep(trials)
    assert len(sweep_rows(trials, straight)) == 3 * 2

    def kill_in_run_1_after_epoch_1(kind, trial, row):
        if kind == "epoch" and trial.index == 1 and row["epoch"] == 1:
            raise Killed  # as if the process died right after run 1 saved its first epoch

    with pytest.raises(Killed):
        run_sweep(_plan(tmp_path / "killed"), on_event=kill_in_run_1_after_epoch_1)
    with pytest.raises(UserError, match="already holds a sweep"):
        _plan(tmp_path / "killed")
    done_before = {i: (t.out / "results.json").stat().st_mtime_ns for i, t in enumerate(_plan(tmp_path / "killed",
                   resume=True)) if t.finished()}
    assert sorted(done_before) == [0]

    events = []
    trials = _plan(tmp_path / "killed", resume=True)
    resumed = run_sweep(trials, on_event=lambda kind, t, p: kind == "batch" or events.append(
        (kind, t.index, p["epoch"] if kind == "epoch" else None)))  # progress within epochs: tests of their own
    assert events == [("skip", 0, None),
                      ("start", 1, None), ("epoch", 1, 2), ("finish", 1, None),  # continued at epoch 2
                      ("start", 2, None), ("epoch", 2, 1), ("epoch", 2, 2), ("finish", 2, None)]
    assert {i: (trials[i].out / "results.json").stat().st_mtime_ns for i in done_before} == done_before
    assert resumed[1]["resumed"] and not resumed[2]["resumed"]
    # and the tables are those of the sweep that was never interrupted
    assert _table(trials, resumed) == _table(trials, straight)
    a, b = summarize(trials, resumed), summarize(trials, straight)
    assert a["grouped"] == b["grouped"] and {**a["best"], **dict.fromkeys(TIMING)} == \
        {**b["best"], **dict.fromkeys(TIMING)}
    assert grid_of(trials) == _grid()


def test_resume_refuses_a_different_sweep(tmp_path):
    _plan(tmp_path / "s")
    with pytest.raises(UserError, match="different epochs"):
        claim(plan("net1", _grid(), tmp_path / "s", epochs=3, data=DATA, seed=1), resume=True)
    with pytest.raises(UserError, match="different grid"):
        claim(plan("net1", {"lr": [0.05, 0.02], "l1_oc": [3]}, tmp_path / "s", epochs=2, data=DATA, seed=1),
              resume=True)
    with pytest.raises(UserError, match="no sweep"):
        _plan(tmp_path / "elsewhere", resume=True)


def test_a_diverging_run_is_reported_and_the_others_still_run(tmp_path):
    trials = plan("net1", {"lr": [1e10, 0.05], "l1_oc": [3]}, tmp_path / "s", epochs=1, data=DATA)
    claim(trials)
    results = run_sweep(trials)
    summary = summarize(trials, results)
    assert [r["status"] for r in summary["runs"]] == ["failed", "finished"]
    assert "diverged" in summary["runs"][0]["error"]
    assert {r["run"] for r in sweep_rows(trials, results)} == {"1"}
    assert summary["best"]["run"] == 1 and math.isfinite(summary["best"]["loss"])
