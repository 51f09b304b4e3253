"""``verify FILE.onnx`` with no --backends checks only the backends that can run an ONNX file (no torch, no aoti)."""
import json

import pytest
import torch

from cifarbench.cli import main
from tests.byo_models import resnet20


def test_verify_an_onnx_file_with_default_backends(tmp_path, capsys):
    torch.manual_seed(0)
    model = resnet20().eval()
    path = tmp_path / "r20.onnx"
    torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(path), "--data", "synthetic:40", "--images", "8", "--json"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    doc = json.loads(out)
    backends = {r["backend"] for r in doc["results"]}
    assert backends and not any(b.startswith("torch") or b == "aoti" for b in backends)
