"""Untrusted files: checkpoints, archives and image folders from elsewhere are checked before use.

Covered elsewhere and not repeated: md5 mismatches (``tests/data/test_data_download.py``,
``tests/data/test_data_omniglot.py::test_md5_mismatch_raises_integrity_error``,
``tests/data/test_data_miniimagenet.py::test_corrupt_archive_is_rejected_by_md5``), archives with
absolute paths, ``..`` or escaping links (``test_data_download.py::test_safe_extract_refuses_escaping_members_and_writes_nothing``),
a missing csv column (``tests/data/test_data_folder.py::test_csv_errors``) and a legacy pickle that
would run code (``tests/core/test_learner.py::test_unsafe_pickle_checkpoint_is_refused``).
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from metamtl import MetaLearner
from metamtl.checkpoint import atomic_save, safe_load
from metamtl.cli import main
from metamtl.data import safe_extract
from metamtl.errors import CheckpointError, IntegrityError

from .conftest import sinusoid_config, tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("untrusted_file")


# -- checkpoints -----------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this object executes ``code`` (what a malicious checkpoint does)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture
def evil(tmp_path):
    """A real torch (zip) checkpoint with the metamtl header whose unpickling writes a marker file."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    learner = tiny_learner()
    obj = learner.state(training_state=True)
    obj["metadata"] = {"payload": RunsCode(f"open({str(marker)!r}, 'w').write('code ran')")}
    torch.save(obj, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(evil, tmp_path, capsys):
    path, marker = evil
    for load in (safe_load, MetaLearner.load,
                 lambda p: tiny_learner().fit(toy_sampler(), iterations=1, progress=False, resume=p)):
        with pytest.raises(CheckpointError, match="refusing to load .*evil.pt: it is not a plain-tensor checkpoint, so it is corrupt or unpickling it would run code; only load checkpoints written by metamtl \\(Unsupported global: GLOBAL (builtins.)?exec"):
            load(path)
    assert main(["evaluate", str(path), "--no-progress"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    # the file really is malicious: an unsafe load runs its code
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def toy_sampler():
    from metamtl.tasks import EpisodeSampler

    return EpisodeSampler(toy_dataset(), 5, 1, 2)


@pytest.fixture
def good(tmp_path):
    learner = tiny_learner()
    learner.fit(toy_sampler(), iterations=2, meta_batch_size=1, progress=False)
    path = learner.save(tmp_path / "good.pt", training_state=True)
    return path, safe_load(path)


def rewrite(path: Path, change) -> Path:
    obj = safe_load(path)
    change(obj)
    out = path.with_name("changed.pt")
    atomic_save(obj, out)
    return out


def flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor of a torch zip checkpoint (bit rot): the file still
    unpickles, into a different weight, unless the CRC-32 torch stored is checked."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def flip_a_member_name_byte(path: Path) -> None:
    """Flip one byte of the first member's name in its local header (bit rot): zipfile decodes the
    UTF-8 flagged name and raises UnicodeDecodeError, a ValueError."""
    data = bytearray(path.read_bytes())
    data[30 + 9] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable checkpoint \\(truncated or corrupt\\?\\)", id="truncated"),
    pytest.param(flip_a_weight_byte, "good.pt is corrupt \\(member .*/data/\\d+\\): Bad CRC-32 .*; its bytes changed after it was written .* copy it again or use another checkpoint", id="bit-flip-in-a-weight"),
    pytest.param(flip_a_member_name_byte, "good.pt is corrupt \\(member .*\\): .*its bytes changed after it was written", id="bit-flip-in-a-member-name"),
    pytest.param(lambda p: p.write_bytes(b""), "not a readable checkpoint", id="empty"),
    pytest.param(lambda p: p.write_bytes(bytes(range(256)) * 40), r"good.pt is not a readable checkpoint: it starts with b'\\x00\\x01\\x02\\x03', not a torch checkpoint's bytes", id="random-bytes"),
    pytest.param(lambda p: p.write_bytes(b"\x80" + bytes(range(256)) * 40), "refusing to load .*: it is not a plain-tensor checkpoint, so it is corrupt or unpickling it would run code", id="pickle-header-then-random-bytes"),
    pytest.param(lambda p: p.write_text("model: conv4\n"), "(not a readable checkpoint|refusing to load)", id="yaml-text"),
    pytest.param(lambda p: torch.save({"weights": torch.zeros(3)}, p), "is not a metamtl checkpoint \\(no 'metamtl-checkpoint' header\\)", id="foreign-torch-file"),
    pytest.param(lambda p: torch.save([1, 2], p), "is not a metamtl checkpoint", id="not-a-mapping"),
    pytest.param(lambda p: torch.save({**safe_load(p), "format_version": None}, p), "good.pt: damaged checkpoint: its format_version must be an integer, got None", id="format-version-none"),
    pytest.param(lambda p: torch.save({**safe_load(p), "format_version": "x"}, p), "good.pt: damaged checkpoint: its format_version must be an integer, got 'x'", id="format-version-text"),
    pytest.param(lambda p: atomic_save({**safe_load(p), "format_version": 99}, p), "written by a newer metamtl \\(checkpoint format 99, this version reads <= 1\\); upgrade metamtl", id="newer-format"),
    pytest.param(lambda p: atomic_save({k: v for k, v in safe_load(p).items() if k != "config"}, p), "is damaged or not a learner checkpoint: it lacks config", id="missing-config"),
    pytest.param(lambda p: atomic_save({**safe_load(p), "config": {**safe_load(p)["config"], "model": {"name": "conv9"}}}, p), "does not match this metamtl version's models and settings .*unknown model 'conv9'", id="unknown-model"),
    pytest.param(lambda p: atomic_save({**safe_load(p), "model_state": {}}, p), "(?s)does not match .*Missing key\\(s\\) in state_dict", id="missing-weights"),
    pytest.param(lambda p: atomic_save({**safe_load(p), "config": {**safe_load(p)["config"], "learner": {"meta_lr": 1e-3, "warp": 9}}}, p), "does not match .*unexpected keyword argument 'warp'", id="unknown-learner-setting"),
])
def test_damaged_or_foreign_checkpoints_are_refused_with_the_reason(good, damage, message):
    path, _ = good
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        MetaLearner.load(path)


def test_a_bad_device_or_a_folder_path_is_blamed_on_the_argument_not_the_checkpoint(good, tmp_path, capsys):
    path, _ = good
    from metamtl.errors import ConfigError

    with pytest.raises(ConfigError, match="^unknown device 'gpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'$"):
        MetaLearner.load(path, device="gpu")  # was: "does not match this metamtl version's models"
    assert main(["evaluate", str(path), "--device", "gpu", "--no-progress"]) == 2
    assert "error: unknown device 'gpu'" in capsys.readouterr().err
    learner = MetaLearner.load(path)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {tmp_path}: it is a folder; give a file path "
                                              f"such as {tmp_path / 'learner.pt'}"):
        learner.save(tmp_path)  # was: "Is a directory ... the previous checkpoint there is intact; free disk space"
    assert path.exists() and MetaLearner.load(path).iteration == learner.iteration


def test_loading_into_another_model_lists_the_differences(good):
    path, _ = good
    from metamtl.models import build_model

    other = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=5)
    with pytest.raises(CheckpointError, match=r"holds a different model than the one given:\n  hidden: 4 != 8"):
        MetaLearner.load(path, model=other)


def test_loading_into_the_same_architecture_spelled_differently_works(tmp_path):
    """model.config kept the settings as given and load compared them literally: a default spelled
    out (in_channels=1, feature_norm=None, pool=True) or per-block widths (hidden=[4, 4]) was refused
    as 'a different model' although the architecture is the very same."""
    from metamtl.models import build_model

    torch.manual_seed(0)
    kw = dict(hidden=4, image_size=8, blocks=2, out_features=None)
    path = MetaLearner(build_model("conv4", **kw), "protonet", device="cpu").save(tmp_path / "a.pt")
    x = torch.randn(4, 1, 8, 8)
    for spelled in ({"in_channels": 1}, {"feature_norm": None}, {"pool": True}, {"pool": [True, True]},
                    {"hidden": [4, 4]}):
        same = build_model("conv4", **(kw | spelled))
        assert torch.equal(MetaLearner.load(path, device="cpu", model=same).model.trunk(x),
                           MetaLearner.load(path, device="cpu").model.trunk(x))
    with pytest.raises(CheckpointError, match=r"different model than the one given:\n  hidden: 4 != \[4, 8\]"):
        MetaLearner.load(path, device="cpu", model=build_model("conv4", **(kw | {"hidden": [4, 8]})))
    mlp = MetaLearner(build_model("mlp", hidden=[8, 8]), "maml", task="regression", device="cpu").save(tmp_path / "m.pt")
    MetaLearner.load(mlp, device="cpu", model=build_model("mlp", in_features=1, hidden=(8, 8), out_features=1))


def test_loading_into_a_multidataset_model_with_per_block_hidden_widths_works(tmp_path):
    """multidataset's hidden goes to a Conv4 of ``blocks`` blocks: hidden=[4, 4] with 2 blocks is hidden=4
    (it was refused as 'a different model': multidataset had no per-block entry)."""
    from metamtl.models import build_model

    torch.manual_seed(0)
    kw = dict(inputs={"a": [1, 16, 16]}, width=4, size=8, blocks=2, out_features=None)
    path = MetaLearner(build_model("multidataset", hidden=4, **kw), "protonet", device="cpu").save(tmp_path / "l.pt")
    x = torch.randn(3, 1, 16, 16)
    same = MetaLearner.load(path, device="cpu", model=build_model("multidataset", hidden=[4, 4], **kw))
    assert torch.equal(same.model.features(x), MetaLearner.load(path, device="cpu").model.features(x))
    with pytest.raises(CheckpointError, match=r"different model than the one given:\n  hidden: 4 != \[4, 8\]"):
        MetaLearner.load(path, device="cpu", model=build_model("multidataset", hidden=[4, 8], **kw))


def test_resuming_with_the_same_architecture_spelled_differently_works(good):
    """Resume compared the model configs literally: hidden=[4, 4] or a spelled-out default was
    refused as 'its config differs' although the architecture is the very same."""
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    path, _ = good
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=[4, 4], image_size=12, blocks=2, out_features=5, pool=True)
    learner = MetaLearner(model, build_algorithm("maml", steps=1, lr=0.3, head_init="learned"),
                          preprocessing=toy_dataset().preprocessing, device="cpu")
    learner.fit(toy_sampler(), iterations=3, meta_batch_size=1, progress=False, resume=path)
    assert learner.iteration == 3
    with pytest.raises(CheckpointError, match=r"its config differs from this learner's:\n  model.hidden: 4 != \[4, 8\]"):
        tiny = MetaLearner(build_model("conv4", hidden=[4, 8], image_size=12, blocks=2, out_features=5),
                           build_algorithm("maml", steps=1, lr=0.3), preprocessing=toy_dataset().preprocessing, device="cpu")
        tiny.fit(toy_sampler(), iterations=3, meta_batch_size=1, progress=False, resume=path)


def test_resume_from_another_config_lists_every_differing_key(good):
    path, _ = good
    other = tiny_learner(meta_lr=5e-3)
    other.algorithm.inner.steps = 3
    with pytest.raises(CheckpointError) as info:
        other.fit(toy_sampler(), iterations=4, meta_batch_size=1, progress=False, resume=path)
    assert "its config differs from this learner's" in str(info.value)
    assert "algorithm.steps: 1 != 3" in str(info.value) and "learner.meta_lr: 0.001 != 0.005" in str(info.value)
    with pytest.raises(CheckpointError, match="fit settings differ:\n  meta_batch_size: 1 != 2"):
        tiny_learner().fit(toy_sampler(), iterations=4, meta_batch_size=2, progress=False, resume=path)
    no_state = tiny_learner().save(path.with_name("plain.pt"))
    with pytest.raises(CheckpointError, match="holds no training state"):
        tiny_learner().fit(toy_sampler(), iterations=4, progress=False, resume=no_state)


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda o: o["training"]["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), id="bad-rng-state"),
    pytest.param(lambda o: o["training"].pop("meta_optimizer"), id="no-optimizer-state"),
    pytest.param(lambda o: o["training"]["meta_optimizer"]["param_groups"].append({"params": [999]}), id="optimizer-state-mismatch"),
    pytest.param(lambda o: o.update(iteration="many"), id="iteration-not-a-number"),
    pytest.param(lambda o: o.update(iteration=-3), id="negative-iteration"),
    pytest.param(lambda o: o.update(iteration="7"), id="iteration-as-text"),
    pytest.param(lambda o: o["training"]["fit_state"].update(settings=None), id="fit-settings-not-a-mapping"),
])
def test_a_damaged_training_state_is_refused_and_rolled_back(good, corrupt):
    path, _ = good
    bad = rewrite(path, corrupt)
    learner = tiny_learner()
    learner.fit(toy_sampler(), iterations=1, meta_batch_size=1, progress=False)
    params = [p.detach().clone() for p in learner.model.parameters()]
    opt = repr(learner.meta_optimizer.state_dict())
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="damaged checkpoint.* nothing was changed"):
        learner.fit(toy_sampler(), iterations=3, meta_batch_size=1, progress=False, resume=bad)
    assert learner.iteration == 1 and repr(learner.meta_optimizer.state_dict()) == opt
    assert all(torch.equal(a, b) for a, b in zip(params, learner.model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)
    learner.fit(toy_sampler(), iterations=1, meta_batch_size=1, progress=False)  # still trains (1 more)
    assert learner.iteration == 2


# -- archives: links that escape only once other links exist ----------------------------------------


def archive(path: Path, kind: str, files=(), links=()) -> Path:
    """A zip or tar with regular ``files`` and ``links`` = [(name, target)], in that order."""
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, target in links:
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                zf.writestr(info, target)
            for name in files:
                zf.writestr(name, b"data")
    else:
        with tarfile.open(path, "w") as tf:
            for name, target in links:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tf.addfile(info)
            for name in files:
                info = tarfile.TarInfo(name)
                info.size = 4
                tf.addfile(info, io.BytesIO(b"data"))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("files, links, bad, why", [
    pytest.param(["l2/evil.txt"], [("l1", "."), ("l1/l2", "..")], "l1/l2", "outside the target folder \\(through other links\\)", id="link-through-link"),
    pytest.param(["a/x"], [("a", "b"), ("b", "a")], "a", "outside the target folder", id="link-loop"),
    pytest.param(["x"], [("d", "sub"), ("d", "../..")], "d", None, id="same-link-twice"),
    pytest.param(["deep/l/evil.txt"], [("deep", "."), ("deep/l", "../..")], "deep/l", None, id="shallow-link-then-escape"),
])
def test_archives_whose_links_escape_through_other_links_are_refused_before_writing(tmp_path, kind, files, links, bad, why):
    path = archive(tmp_path / f"bad.{kind}", kind, files, links)
    with pytest.raises(IntegrityError, match=why or "refusing to extract") as info:
        safe_extract(path, tmp_path / "target")
    assert repr(bad) in str(info.value) and "nothing was extracted" in str(info.value)
    assert not (tmp_path / "target").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archives_with_links_that_stay_inside_still_extract(tmp_path, kind):
    path = archive(tmp_path / f"ok.{kind}", kind, ["sub/a.txt", "here/b.txt"], [("here", "sub"), ("up", "sub/..")])
    safe_extract(path, tmp_path / "t")
    assert (tmp_path / "t" / "sub" / "b.txt").read_bytes() == b"data"  # written through the link
    assert (tmp_path / "t" / "up" / "sub" / "a.txt").read_bytes() == b"data"


# -- a corrupt image in a user folder, through the command line --------------------------------------


def test_cli_names_the_corrupt_image(tmp_path, capsys):
    root = tmp_path / "images"
    for c in range(6):
        for i in range(4):
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("L", (12, 12), 10 * c + i).save(root / f"class{c}" / f"{i}.png")
    bad = root / "class3" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cfg = sinusoid_config(tmp_path / "runs", **{
        "data": {"name": "folder", "root": str(root), "cache_dir": str(tmp_path / "cache"), "val_split": None},
        "tasks": {"ways": 2, "shots": 1, "queries": 1}, "model": {"name": "conv4", "hidden": 4, "blocks": 2},
        "algorithm": {"name": "maml", "head_init": "zero"}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot decode image {bad}" in err and "corrupt or truncated: replace or delete it" in err
    assert "Traceback" not in err
