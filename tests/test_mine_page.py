"""``cifarbench mine --out DIR``: DIR/index.html shows only figures that exist (relative links), and every number it
shows equals the JSON (the exact value in each cell's ``data-value``, the text that value rounded); the counts in its
text equal the JSON's lists. One small real run (bundled net1 weights, synthetic data, a few seconds)."""
from __future__ import annotations

import json
import re

from cli_helpers import run_cli
from test_sweep_outputs import check_cells, read_page

ARGS = ("net1", "--filters", "conv1:0", "conv2:1", "--top", "4", "--show", "2", "--data", "synthetic:200",
        "--backend", "torch", "--device", "cpu")


def test_mine_page_shows_existing_figures_and_the_jsons_numbers(tmp_path, capsys):
    out = tmp_path / "mine"
    code, stdout, err = run_cli(capsys, "mine", *ARGS, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads((out / "mining.json").read_text()) == result
    page = read_page(out)  # every image a relative path to a file that exists
    assert page.result == result

    # one figure per filter mined (--show 2), each shown
    assert [(f["layer"], f["filter"]) for f in result["filters"]] == [("conv1", 0), ("conv2", 1)]
    assert sorted(page.images) == sorted(f"filters/{f['layer']}_filter{f['filter']}.png" for f in result["filters"])

    tables = {t["title"]: t for t in page.tables}
    t = tables["Responses"]
    assert t["columns"] == ["layer", "filter", "max class", "mean top response", "max response"]
    check_cells(t, [[f["layer"], f["filter"], f["max_class"], f["mean_top_response"], f["max_response"]]
                    for f in result["filters"]])
    t = tables["Receptive fields"]
    assert t["columns"] == ["layer", "receptive field"]
    check_cells(t, [[k, v] for k, v in result["receptive_fields"].items()])
    assert set(tables) == {"Responses", "Receptive fields"}

    # the numbers in the page's sentences: the dead filters and those with only negative top responses
    chunks = [" ".join(c.split()) for c in page.text]
    dead = [m for c in chunks if (m := re.fullmatch(r"(\d+) filters? whose pre-ReLU map is <= 0 [^:.]*"
                                                     r"(?:: ([\w:, ]+))?\.?", c))]
    assert len(dead) == 1 and int(dead[0].group(1)) == len(result["dead_filters"]), chunks
    # which ones, as dead_filters.csv names them
    assert (dead[0].group(2) or "").split(", ") == \
        ([f"{d['layer']}:{d['filter']}" for d in result["dead_filters"]] or [""])
    negative = [m for c in chunks if (m := re.fullmatch(r"(\d+) filters? whose largest response is below 0[^:]*"
                                                         r"(?:: ([\w:, ]+))?\.?", c))]
    assert len(negative) == 1, chunks
    negative = negative[0]
    assert int(negative.group(1)) == len(result["negative_filters"]), negative.group(0)
    names = [f"{n['layer']}:{n['filter']}" for n in result["negative_filters"]]
    assert (negative.group(2) or "").split(", ") == (names or [""])
    assert names == [f"{f['layer']}:{f['filter']}" for f in result["filters"] if f["all_top_negative"]]
