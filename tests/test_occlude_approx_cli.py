"""``--mode approx`` through the API and the CLI, against the naive occlusion loop (tests/occlusion_reference.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarbench.cli import main
from cifarbench.zoo import load_model
from occlusion_reference import naive_map

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def image(name):
    from cifarbench.analysis.occlusion import load_image

    return load_image(EXAMPLES / name)[0]


def test_api_approx_with_tau_0_in_fp32_is_exact():
    from cifarbench import occlusion_map

    model, img = load_model("net1"), image("cat.png")
    r = occlusion_map(model, img, 8, stride=2, mode="approx", tau=0.0, coarse=2, approx_precision="fp32")
    target = int(torch.softmax(model(img[None]), 1).argmax())
    assert r.engine["mode"] == "approx" and r.engine["tau"] == 0.0
    np.testing.assert_allclose(r.map, naive_map(model, img, 8, 2, target)[0], atol=1e-5)


def test_cli_approx_default_is_close_and_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["occlude", "--k", "8", str(EXAMPLES / "cat.png"), "--mode", "approx", "--out", str(tmp_path),
              "--json"])
    assert exc.value.code == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["engine"]["mode"] == "approx" and r["engine"]["exact_positions"] < r["engine"]["positions"]
    model, img = load_model("net1"), image("cat.png")
    exact = naive_map(model, img, 8, 1, r["target"])[0]
    got = np.load(tmp_path / "cat_k8.npy")
    assert np.abs(got - exact).mean() <= 0.01


def test_cli_approx_precision_fp32_with_every_position_computed_is_the_exact_map(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["occlude", "--k", "8", "--stride", "3", str(EXAMPLES / "cat.png"), "--mode", "approx", "--tau", "0",
              "--coarse", "1", "--approx-precision", "fp32", "--out", str(tmp_path), "--json", "--no-figures"])
    assert exc.value.code == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["engine"]["precision"] == "fp32" and r["engine"]["exact_positions"] == r["engine"]["positions"]
    model, img = load_model("net1"), image("cat.png")
    np.testing.assert_allclose(np.load(tmp_path / "cat_k8.npy"), naive_map(model, img, 8, 3, r["target"])[0],
                               atol=1e-5)


@pytest.mark.parametrize("args", [["--tau", "0.1"], ["--mode", "approx", "--tau", "2"],
                                  ["--mode", "approx", "--coarse", "0"], ["--approx-precision", "fp32"],
                                  ["--mode", "approx", "--approx-precision", "fp64"]])
def test_bad_approx_knobs_are_one_line(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["occlude", str(EXAMPLES / "cat.png"), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:")
