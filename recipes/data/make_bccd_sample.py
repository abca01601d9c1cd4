"""Write ``recipes/data/bccd_sample/``: the embedded default of ``repquant demo`` (a seeded subset of BCCD).

Copies, unchanged, 48 val and 64 train images with their YOLO label files from ``../shared/data/bccd`` (the
BCCD data set, MIT licence: its LICENSE goes with the copy) and lists them in the sample's README.

    python recipes/data/make_bccd_sample.py [--source ../shared/data/bccd]
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
COUNTS = {"val": 48, "train": 64}
SEED = 0
README = """# BCCD sample: the embedded default data of `repquant demo`

112 real blood-smear microscope images (640x480 JPEG) with boxes for 3 cell classes (0 RBC, 1 WBC,
2 Platelets): 48 of the BCCD val split and 64 of its train split, drawn with `random.Random(0)` by
`recipes/data/make_bccd_sample.py` and copied unchanged with their YOLO label files (`class cx cy w h`,
normalised). Data set YAML: `recipes/data/bccd_sample.yaml`.

## Source and licence
GitHub `Shenggan/BCCD_Dataset`, commit `d272fb14cdff6e473fafeeeba32aba5f560e9e43`, `BCCD/JPEGImages/*.jpg`
with labels converted from `BCCD/Annotations/*.xml` (the repo credits the original data to
github cosmicad/dataset and akshaylamba/all_CELL_data); the train/val split is the repo's
`BCCD/ImageSets/Main/{train,val}.txt`. MIT licence, see `LICENSE` (copied from the source repository).
The committed `benchmarks/checkpoints/yolov6n_bccd.safetensors` was trained on the full BCCD train split,
so the val images here were never seen in training.

## Images
{listing}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=HERE.parents[2] / "shared" / "data" / "bccd")
    args = parser.parse_args()
    target = HERE / "bccd_sample"
    chosen: dict[str, list[str]] = {}
    for split, count in COUNTS.items():
        names = sorted(p.stem for p in (args.source / "images" / split).glob("*.jpg"))
        chosen[split] = sorted(random.Random(SEED).sample(names, count))
        for sub, ext in (("images", ".jpg"), ("labels", ".txt")):
            folder = target / sub / split
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for name in chosen[split]:
                shutil.copy2(args.source / sub / split / f"{name}{ext}", folder / f"{name}{ext}")
    listing = "\n".join(f"- {split} ({len(names)}): " + ", ".join(names) for split, names in chosen.items())
    (target / "README.md").write_text(README.replace("{listing}", listing))
    print(f"wrote {target}: " + ", ".join(f"{len(v)} {k}" for k, v in chosen.items()))


if __name__ == "__main__":
    main()
