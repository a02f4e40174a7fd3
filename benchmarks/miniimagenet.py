"""mini-ImageNet few-shot benchmark: 5-way 1-shot and 5-shot.

Protocol (Ravi & Larochelle 2017 split; Finn et al. 2017): 84x84 RGB images, 15 queries per
class, 600 test episodes with a 95% confidence interval; the configs' trunk is conv4 with widths
32-64-128-256 (MAML's conv4 with 32 filters: add ``model.hidden=32``).  Meta-trains on
the 64 train classes, selects the best-validation weights on the 16 val classes and reports the
20 test classes.

When test.csv and its images are absent (the train+val archive in ../shared/data has none), the
script reports on the VAL classes instead, says so loudly, and evaluates the final weights with no
selection on val (so the val classes are used for nothing but this report and learning curves).

Configs: configs/benchmarks/miniimagenet_5w<K>s.yaml (also usable with ``metamtl fit``).  By default
each setting trains its own learner; ``--one-learner`` trains once (with the 5w1s config, which
5w5s extends, whatever the order of ``--settings``; the method's per-task prototype heads serve
any number of shots) and evaluates every setting with that learner, which halves the cost on
CPU; RESULTS.md rows say which.

    python benchmarks/miniimagenet.py --one-learner --budget-minutes 60        # CPU
    python benchmarks/miniimagenet.py --device cuda --budget-minutes 0 train.iterations=30000
"""
from __future__ import annotations

from common import banner, commit, data_root, parser, run_settings

from metamtl.data import MiniImageNet

SETTINGS = ("5w1s", "5w5s")


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], SETTINGS)
    p.add_argument("--one-learner", action="store_true",
                   help="train one learner (the 5w1s config, which 5w5s extends) and evaluate it at every setting")
    args = p.parse_args()
    root = data_root(args.data_root)
    commit()  # before RESULTS.md is touched
    overrides = [f"data.root={root}"]
    if MiniImageNet.has_split(root, "test"):
        desc = "mini-ImageNet test classes (20)"
        banner("mini-ImageNet: train on 64 train classes, select on 16 val classes, report 20 TEST classes")
    else:
        desc = "mini-ImageNet **VAL** classes (16; no test images), 300 train img/class"
        overrides += ["data.test_split=val", "eval.checkpoint=last"]
        banner("mini-ImageNet: NO TEST SPLIT FOUND (test.csv and its images are not in the data folder).",
               "Reporting accuracy on the 16 VALIDATION classes instead (600 episodes, other seeds than",
               "the validation curves), with no model selection on them: the final weights are evaluated.",
               "These numbers are NOT test-set numbers and are not directly comparable to published ones.")
    run_settings(args, "miniimagenet", overrides, desc, "miniimagenet", "mini-ImageNet")


if __name__ == "__main__":
    main()
