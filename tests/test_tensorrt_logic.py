"""TensorRT path: the pure logic (profiles, cache keys, engine headers, compatibility, calibration batching,
error lines) runs everywhere; building and running a real engine needs TensorRT and a GPU and skips without."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cifarbench.errors import UserError
from cifarbench.export.tensorrt import (
    MAGIC, CalibrationFeed, Profile, check_compatible, engine_cache_key, gpu_slug, make_profile, pack_engine,
    parser_error_line, timing_cache_name, unpack_engine,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_defaults_and_bounds():
    assert make_profile() == Profile(1, 256, 1024)
    assert make_profile(max_batch=100) == Profile(1, 64, 100)
    assert make_profile(max_batch=1) == Profile(1, 1, 1)
    assert make_profile(max_batch=625, opt_batch=625) == Profile(1, 625, 625)
    assert make_profile(max_batch=64, min_batch=8).opt_batch == 64
    assert make_profile(max_batch=512).shapes() == ((1, 3, 32, 32), (256, 3, 32, 32), (512, 3, 32, 32))
    for bad in ({"max_batch": 0}, {"max_batch": 8, "opt_batch": 9}, {"max_batch": 8, "min_batch": 9},
                {"max_batch": 8, "min_batch": 4, "opt_batch": 2}):
        with pytest.raises(UserError, match="bad batch profile"):
            make_profile(**bad)


def test_cache_key_changes_with_every_input():
    base = ("a" * 64, "10.3.0", "NVIDIA H100 80GB HBM3", "fp16", make_profile())
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base) and len(key) == 24
    variants = [("b" * 64,) + base[1:], base[:1] + ("10.4.0",) + base[2:], base[:2] + ("NVIDIA H200",) + base[3:],
                base[:3] + ("int8",) + base[4:], base[:4] + (make_profile(max_batch=2048),)]
    keys = {engine_cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_timing_cache_name_is_per_version_and_gpu():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert timing_cache_name("10.3.0", "NVIDIA H100 80GB HBM3") == "timing-trt10.3.0-nvidia-h100-80gb-hbm3.cache"
    assert timing_cache_name("10.3.0", "A") != timing_cache_name("10.4.0", "A")


def test_engine_header_roundtrip_and_corruption():
    header = {"trt_version": "10.3.0", "gpu": "NVIDIA H100", "precision": "fp16",
              "profile": {"min_batch": 1, "opt_batch": 256, "max_batch": 1024}}
    blob = pack_engine(header, b"\x01engine-bytes")
    assert blob.startswith(MAGIC)
    assert unpack_engine(blob) == (header, b"\x01engine-bytes")
    with pytest.raises(UserError, match="not a cifarbench TensorRT engine"):
        unpack_engine(b"ftrt" + b"\x00" * 40)
    with pytest.raises(UserError, match="truncated"):
        unpack_engine(pack_engine(header, b""))
    with pytest.raises(UserError, match="unreadable header"):
        unpack_engine(MAGIC + (5).to_bytes(4, "little") + b"{oops" + b"engine")


def test_engine_from_another_gpu_or_version_is_refused():
    header = {"trt_version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3"}
    check_compatible(header, "10.3.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(UserError, match="built with TensorRT 10.3.0, this is TensorRT 10.5.0"):
        check_compatible(header, "10.5.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(UserError, match="built for NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"):
        check_compatible(header, "10.3.0", "NVIDIA H200")


def test_calibration_feed_gives_fixed_size_batches_in_order():
    images = torch.rand(300, 3, 32, 32)
    feed = CalibrationFeed(images, batch=128, device="cpu")
    got = []
    while (b := feed.next_batch()) is not None:
        assert b.is_contiguous() and b.dtype == torch.float32 and feed.current is b
        got.append(b)
    assert [len(b) for b in got] == [128, 128]  # the partial batch is dropped: TensorRT wants one batch size
    torch.testing.assert_close(torch.cat(got), images[:256])
    small = CalibrationFeed(images[:10], batch=128, device="cpu")
    assert small.batch == 10 and len(small.next_batch()) == 10 and small.next_batch() is None
    with pytest.raises(UserError):
        CalibrationFeed(images[:0], batch=8, device="cpu")


def test_parser_errors_become_one_line():
    assert parser_error_line([], "m.onnx") == "TensorRT could not parse m.onnx"
    line = parser_error_line(["In node 3 (Conv): unsupported\nmore detail", "second"], "m.onnx")
    assert line == "TensorRT could not parse m.onnx: In node 3 (Conv): unsupported (and 1 more)"


def test_engine_file_errors_before_tensorrt(tmp_path):
    from cifarbench.runtime import open_runtime

    with pytest.raises(UserError, match="no such TensorRT engine"):
        open_runtime(tmp_path / "missing.engine")
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not a cifarbench TensorRT engine"):
        open_runtime(bad)


@pytest.mark.skipif(HAS_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are present")
def test_missing_tensorrt_or_gpu_is_a_user_error(tmp_path):
    from cifarbench.runtime import open_runtime
    from runtime_helpers import fitted_model

    with pytest.raises(UserError, match="TensorRT"):
        open_runtime(fitted_model("net1"), "tensorrt", device="cuda")
    engine = tmp_path / "m.engine"
    engine.write_bytes(pack_engine({"trt_version": "10.3.0", "gpu": "X", "precision": "fp32",
                                    "profile": {"min_batch": 1, "opt_batch": 1, "max_batch": 1}}, b"x"))
    with pytest.raises(UserError, match="TensorRT"):
        open_runtime(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (pip install tensorrt on the GPU machine)")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_engine_parity_and_splitting(precision):
    from cifarbench.parity import error_metrics, judge
    from cifarbench.runtime import open_runtime
    from runtime_helpers import fitted_model, sample_images

    model = fitted_model("net1")
    rt = open_runtime(model, "tensorrt", device="cuda", precision=precision, max_batch=64,
                      calib=128, calib_data="synthetic")
    assert rt.max_batch == 64 and rt.precision == precision
    x = sample_images()  # 200 images > max_batch: split into 64, 64, 64, 8
    with torch.no_grad():
        ref = model(x)
    assert judge(error_metrics(ref, rt.logits(x.cuda())), precision)[0]
    again = open_runtime(model, "tensorrt", device="cuda", precision=precision, max_batch=64,
                         calib=128, calib_data="synthetic")  # from the engine cache
    assert again.header == rt.header
