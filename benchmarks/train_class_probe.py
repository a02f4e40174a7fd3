"""A probe split made of mini-ImageNet TRAINING classes only, to choose settings without the val classes.

Here the val classes are the only held-out classes (the archive has no test images), so a setting
chosen on them is no longer judged on unseen classes.  This script writes a data root whose
``train`` split is most of the 64 training classes and whose ``val`` split is the rest (the
training classes sorted by WordNet id, every ``--every``-th held out: positions ``every - 1``,
``2 * every - 1``, ...), so candidates can be compared on classes no final row is measured on::

    python benchmarks/train_class_probe.py /tmp/miniprobe          # 48 training + 16 probe classes
    metamtl fit configs/benchmarks/miniimagenet_5w1s.yaml data.root=/tmp/miniprobe \\
        algorithm.num_classes=48 data.test_split=val eval.checkpoint=last model.hidden=H

It reads the train split from ``--data-root`` (else ``$METAMTL_DATA``: a folder with ``images/`` and
``train.csv`` or the train+val archive) and writes ``OUT/mini-imagenet/{images/, train.csv,
val.csv}`` (the training images only; nothing of the val classes is copied), built in a temporary
folder beside it and renamed at the end, so an interrupted run leaves no half-written root.  The
benchmark trunk was chosen on this split (RESULTS.md, "Reading the mini-ImageNet rows").
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


Rows = list[tuple[str, str]]  # (filename, label)


def split_rows(rows: Rows, every: int) -> tuple[Rows, Rows, list[str]]:
    """(train rows, probe rows, probe classes): every ``every``-th class in sorted order is a probe class."""
    labels = sorted({label for _, label in rows})
    if every < 2 or every > len(labels):
        raise SystemExit(f"--every must be between 2 and the number of training classes ({len(labels)}), got {every}")
    probe = [label for i, label in enumerate(labels) if i % every == every - 1]
    held = set(probe)
    return [r for r in rows if r[1] not in held], [r for r in rows if r[1] in held], probe


def write_csv(path: Path, rows: Rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    from metamtl.data import MiniImageNet
    from metamtl.data.folder import read_class_csv
    from metamtl.errors import DataError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the new data root (OUT/mini-imagenet/ is created; it must not exist yet)")
    p.add_argument("--data-root", default=None, help="where mini-ImageNet is (default: $METAMTL_DATA)")
    p.add_argument("--every", type=int, default=4, help="hold out every N-th training class (default 4: 16 of 64)")
    args = p.parse_args(argv)
    target = Path(args.out) / "mini-imagenet"
    if target.exists():
        raise SystemExit(f"{target} already exists: remove it or choose another output folder")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    try:
        with MiniImageNet.source(args.data_root, "train") as tree:
            # the library's csv reader: the same checks (columns, empty cells, repeated rows) as loading
            rows = list(zip(*read_class_csv(tree.read("train.csv"), tree.describe("train.csv"), "filename", "label")))
            bad = [f for f, _ in rows if Path(f).name != f or f in (".", "..")]
            if bad:
                raise SystemExit(f"train.csv names files outside images/ (e.g. {bad[0]!r}): fix the csv")
            train, probe, probe_classes = split_rows(rows, args.every)
            (partial / "images").mkdir(parents=True)
            for filename, _ in rows:
                (partial / "images" / filename).write_bytes(tree.read(f"images/{filename}"))
    except DataError as exc:  # no data there (DataNotFoundError), or a bad csv
        raise SystemExit(str(exc)) from None
    write_csv(partial / "train.csv", train)
    write_csv(partial / "val.csv", probe)
    partial.rename(target)
    kept = len({label for _, label in train})
    print(f"{target}: train {len(train)} images of {kept} classes, val (probe) {len(probe)} images of "
          f"{len(probe_classes)} training classes: {', '.join(probe_classes)}")


if __name__ == "__main__":
    main()
