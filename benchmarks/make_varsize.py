"""Make a "folder of photos of widely varying size" from a segmentation folder (e.g. CamVid).

Every image and its mask are rescaled to a random short side, log-uniform in [--min, --max] px
(default 64-1024), so the content scales with the resolution as it does across cameras and
crops; images are re-encoded as JPEG (quality 95), masks stay PNG (nearest neighbour). Seeded, so
the same folder comes out every time. Used by ``benchmarks/realdata.sh scale`` to measure
``data.resize`` settings:

    python benchmarks/make_varsize.py ../shared/data/camvid runs/realdata/camvid_varsize
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from PIL import Image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder with images/<split>/ and masks/<split>/")
    p.add_argument("output", help="output folder (same layout)")
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--limit", type=int, nargs="+", default=[0, 100], help="images per split (0: all)")
    p.add_argument("--min", type=int, default=64, help="smallest short side (px)")
    p.add_argument("--max", type=int, default=1024, help="largest short side (px)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    src, dst = Path(args.source), Path(args.output)
    rng = random.Random(args.seed)
    lo, hi = math.log2(args.min), math.log2(args.max)
    for split, limit in zip(args.splits, args.limit + [0] * len(args.splits)):
        files = sorted(f for f in (src / "images" / split).iterdir() if f.is_file())
        if limit:
            files = files[:: max(1, len(files) // limit)][:limit]  # evenly spaced
        (dst / "images" / split).mkdir(parents=True, exist_ok=True)
        (dst / "masks" / split).mkdir(parents=True, exist_ok=True)
        for f in files:
            image = Image.open(f).convert("RGB")
            mask = Image.open(src / "masks" / split / f"{f.stem}.png")
            short = round(2 ** rng.uniform(lo, hi))
            w, h = image.size
            k = short / min(w, h)
            size = (max(1, round(w * k)), max(1, round(h * k)))
            image.resize(size, Image.BILINEAR).save(dst / "images" / split / f"{f.stem}.jpg", quality=95)
            mask.resize(size, Image.NEAREST).save(dst / "masks" / split / f"{f.stem}.png")
        print(
            f"{split}: {len(files)} images, short sides {args.min}-{args.max} px -> {dst / 'images' / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
