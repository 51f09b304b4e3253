"""Figures a paper would take (issue 15): titles and captions name the model, the data and what was changed;
"none" where no class gained; filters whose top responses are all negative are flagged in mine's JSON."""
from __future__ import annotations

import numpy as np
import pytest

from cifarbench.analysis.mining import MiningResult, all_top_negative


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (3, 32, 32), dtype=np.uint8)


def _png_text(path):
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


CAPTION = "net4 (3d381a2e) · imagefolder:cifar10-jpeg75.tar.gz:3dfe:test[slice(0, 500, None)] · onnxruntime fp32 cpu"


def test_ablation_png_names_model_data_and_zeroed_filters_once(tmp_path):
    from cifarbench.analysis.figures import confusion_figure, flipped_grid

    filters = [{"layer": "conv1", "filter": 0}, {"layer": "conv1", "filter": 1}, {"layer": "conv3", "filter": 7}]
    conf = np.eye(3, dtype=int) * 5
    text = _png_text(confusion_figure(conf, conf, ["a", "b", "c"], tmp_path / "c.png", filters=filters,
                                      title="net4", caption=CAPTION + " · zeroed conv1:0,1 conv3:7"))
    assert text["Title"] == "net4: confusion matrices before and after zeroing conv1:0,1 conv3:7"
    assert "net4" in text["Description"] and "test[0:500]" in text["Description"]  # data, readable
    text = _png_text(flipped_grid([_image()], [{"index": 3, "label": "cat", "before": "cat", "after": "dog"}],
                                  tmp_path / "f.png", filters=filters, title="net4", caption=CAPTION))
    assert text["Title"].startswith("net4: 1 image right before and wrong after zeroing conv1:0,1 conv3:7")
    assert text["Title"].count("zeroing") == 1


def test_caption_sits_below_the_axes_without_overlap(tmp_path):
    from cifarbench.analysis.figures import _tuck_caption, flipped_fig

    items = [{"index": i, "label": "cat", "before": "cat", "after": "dog"} for i in range(3)]
    fig = flipped_fig([_image(i) for i in range(3)], items, title="net4", caption=CAPTION * 2)
    _tuck_caption(fig)   # what save_figure does before writing
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    cap = fig._cifarbench_caption_artist.get_window_extent(renderer)
    lowest = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.has_data())
    assert cap.y1 <= lowest and lowest - cap.y1 < 0.05 * fig.bbox.height   # below, and close
    assert cap.width <= fig.bbox.width                                        # wrapped to the figure
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_sweep_tables_say_none_when_no_class_gained(tmp_path):
    from cifarbench.commands.ablate import _gainer

    row = {"largest_gain": {"class": "bird", "change": 0.0}, "largest_loss": {"class": "cat", "change": -0.02}}
    assert _gainer(row, "gain") == "none" and _gainer(row, "loss") == "cat"
    row = {"largest_gain": {"class": "bird", "change": 0.01}, "largest_loss": {"class": "cat", "change": 0.0}}
    assert _gainer(row, "gain") == "bird" and _gainer(row, "loss") == "none"


def test_mine_json_flags_filters_whose_top_responses_are_all_negative():
    # hand-built: filter (conv1, 0) has a positive best image, (conv6, 3) only negative ones, (conv6, 4) ties at 0
    resp = np.array([[5.0, -1.0], [-0.5, -2.0], [0.0, -1.0]])
    result = MiningResult(selection=(("conv1", 0), ("conv6", 3), ("conv6", 4)), top_index=np.array([[0, 1]] * 3),
                          top_response=resp, top_position=np.zeros((3, 2, 2), int),
                          top_patch=np.zeros((3, 2, 4), int), labels=np.array([[0, 1]] * 3), classes=("a", "b"),
                          receptive_fields={"conv1": 3, "conv6": 20}, dead=()).to_json()
    assert [f["all_top_negative"] for f in result["filters"]] == [False, True, False]
    assert result["negative_filters"] == [{"layer": "conv6", "filter": 3}]
    assert all_top_negative([-1e-9]) and not all_top_negative([]) and not all_top_negative([0.0])


def test_mining_figure_names_model_filter_and_defines_response_and_box():
    from cifarbench.analysis.figures import mining_fig

    top = [{"index": 1, "label": "cat", "response": 2.0, "patch": [0, 0, 5, 7]}]
    fig = mining_fig([_image()], {"layer": "conv3", "filter": 4, "top": top, "all_top_negative": True},
                     title="net4", total=20, caption=CAPTION)
    title = fig._suptitle.get_text()
    assert title.startswith("net4: conv3 filter 4: top 1 of 20 images") and "negative" in title  # JSON's flag wins
    assert "spatial sum" in fig._cifarbench_caption and "argmax" in fig._cifarbench_caption
    assert "test[0:500]" in fig._cifarbench_caption
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("baseline, name", [([0.5] * 3, "gray"), ([0.0] * 3, "black"), ([0.2, 0.3, 0.4], "(0.2,0.3,0.4)")])
def test_occlusion_panels_say_what_the_patch_is(baseline, name):
    from cifarbench.analysis.occlusion import OcclusionResult
    from cifarbench.analysis.occlusion_plot import occlusion_figure, patch_name

    assert patch_name(baseline) == name
    r = OcclusionResult(map=np.full((25, 25), 0.5), clean_prob=0.9, target=3, predicted=3, k=8, stride=1,
                        baseline=baseline, image="cat.png")
    fig = occlusion_figure(_image(), [r], "cat.png", model="net1", true_label="cat", caption=CAPTION)
    assert f"K=8 {name} patch" in fig.axes[1].get_title()
    assert "model net1" in fig._suptitle.get_text() and "true cat" in fig._suptitle.get_text()
    assert fig._cifarbench_caption.startswith("net4 (3d381a2e)")   # goes into the PNG's Description too
    import matplotlib.pyplot as plt

    plt.close(fig)
