#!/usr/bin/env bash
# Regenerates docs/figures/*.png, the README's "What it makes", from the bundled weights and the shared test
# images, on the CPU in a few minutes. Usage: bash docs/make_figures.sh [DATA]
# (DATA: default ../shared/data/cifar10-jpeg75.tar.gz; cifarbench must be installed.)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg75.tar.gz}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cifarbench occlude --model net4 --k 4 --k 8 --k 12 examples/cat.png --out "$work/occ" 2>/dev/null
cifarbench ablate net4 --filters conv1:0-7 --data "$DATA" --limit 500 --out "$work/abl" 2>/dev/null
cifarbench mine net4 --filters conv4:3 --data "$DATA" --limit 1000 --top 6 --show 6 --out "$work/mine" 2>/dev/null
# four tiny nets trained for 2 epochs each (about 6 minutes on 2 CPU cores)
cifarbench sweep net1 --grid l1_oc=6,12 --grid kernel_size=3,5 --epochs 2 --data "$DATA" --out "$work/sweep" 2>/dev/null

# READMEs want small files: scale to at most 1000 px wide and keep the PNG's Title/Description (what it shows)
python - "$work" <<'PY'
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

work = Path(sys.argv[1])
for src, name in ((work / "occ/cat_occlusion.png", "occlusion.png"), (work / "abl/confusion.png", "ablation.png"),
                  (work / "mine/filters/conv4_filter3.png", "mining.png"),
                  (work / "sweep/plots/test_accuracy.png", "sweep.png")):
    with Image.open(src) as im:
        info = PngImagePlugin.PngInfo()
        for key, value in im.text.items():
            info.add_itxt(key, value)
        im = im.convert("RGB")
        if im.width > 1000:
            im = im.resize((1000, round(im.height * 1000 / im.width)), Image.LANCZOS)
        out = Path("docs/figures") / name
        im.save(out, pnginfo=info, optimize=True)
        print(f"{out}: {im.width}x{im.height}, {out.stat().st_size // 1024} KB")
PY
