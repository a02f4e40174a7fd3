"""Omniglot few-shot benchmark: 5-way and 20-way, 1-shot and 5-shot.

Protocol (Vinyals et al. 2016; Finn et al. 2017): conv4 with 64 filters on 28x28 images, rotations
by 90/180/270 degrees as extra training classes, 600 test episodes (15 queries per class) with a
95% confidence interval.  Data:

* the full official Omniglot when ``images_background`` and ``images_evaluation`` are present
  (zip or folder): background alphabets for training/validation, evaluation alphabets for testing;
* otherwise the two official small subsets (small1 + small2, 242 characters) split by character
  into train/val/test, so test characters are never seen in training; numbers are then NOT
  comparable to published ones (different, smaller test alphabet set).  The script says which.

One config per setting in configs/benchmarks/omniglot_<N>w<K>s.yaml (also usable with
``metamtl fit``); each setting trains its own learner.  Results go to runs/benchmarks/ and a row
per setting to benchmarks/RESULTS.md.

    python benchmarks/omniglot.py --budget-minutes 5              # CPU, all four settings
    python benchmarks/omniglot.py --settings 20w1s --device cuda --budget-minutes 0 train.iterations=20000
"""
from __future__ import annotations

from common import banner, commit, data_root, parser, run_settings

from metamtl.data import Omniglot

SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s", "20w1s_alphabet")
FULL = ["images_background", "images_evaluation"]
SMALL = ["images_background_small1", "images_background_small2"]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], SETTINGS)
    p.add_argument("--one-learner", action="store_true",
                   help="settings whose configs train alike (one extends the other) share one learner")
    args = p.parse_args()
    root = data_root(args.data_root)
    commit()  # before RESULTS.md is touched
    full = set(FULL) <= set(Omniglot.available_sources(root))
    if full:
        sources, desc = FULL, "Omniglot full (background -> evaluation alphabets)"
        banner("Omniglot: FULL official protocol",
               "train/val: images_background (964 characters), test: images_evaluation (659 characters)")
    else:
        sources, desc = SMALL, "Omniglot small1+small2, held-out characters"
        banner("Omniglot: full official set NOT found; using images_background_small1 + small2",
               "(242 characters split 60/20/20 by character: test characters unseen in training).",
               "Not comparable to published numbers, which use the 659 evaluation characters.")
    overrides = [f"data.root={root}", f"data.sources=[{','.join(sources)}]"]
    run_settings(args, "omniglot", overrides, desc, "omniglot", "Omniglot")


if __name__ == "__main__":
    main()
