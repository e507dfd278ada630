"""Hostile and careless input (issue 14), crafted here: label-file paths and links that leave ``--input``,
hidden files, malicious shard members (``../``, absolute names, links, devices), huge members, corrupt and
decompression-bomb images in verify / inspect / split / evaluate / the training pipeline."""
from __future__ import annotations

import csv
import io
import os

import pytest

from test_shard_formats import AFFECT_HEADER, build, img_bytes, make_image_folder, make_rafdb, write
from ssfer_dist.errors import UserError


# ------------------------------------------------------------------------- label files and links (item 2)
def _secret_outside(tmp_path) -> str:
    return write(os.path.join(tmp_path, "outside", "secret.jpg"), img_bytes(100, 100, seed=99))


def _affectnet_rows(root, rels):
    rows = [AFFECT_HEADER] + [[r, "0", "0", "100", "100", "", "1", "0", "0"] for r in rels]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write(os.path.join(root, "Manually_Annotated_file_lists", "training.csv"), buf.getvalue().encode())


def test_affectnet_paths_must_stay_inside_input(tmp_path):
    secret = _secret_outside(tmp_path)
    root = tmp_path / "an"
    write(os.path.join(root, "Manually_Annotated_Images", "a", "ok.jpg"), img_bytes(100, 100, seed=1))
    os.symlink(secret, os.path.join(root, "Manually_Annotated_Images", "a", "link.jpg"))
    _affectnet_rows(root, ["a/ok.jpg", "../../outside/secret.jpg", secret, "a/link.jpg", "a/../a/ok.jpg"])
    rep = build("affectnet", root, tmp_path / "out")
    # a/../a/ok.jpg stays inside (a second key for the same file); the other three are refused
    assert rep["num_samples"] == 2
    assert rep["skipped_by_reason"] == {"absolute_path": 1, "outside_input": 2}
    items = {s["item"].rsplit(":", 1)[1]: s for s in rep["skipped"]}
    assert items["3"]["reason"] == "outside_input" and "--allow-outside" in items["3"]["detail"]
    assert items["4"]["reason"] == "absolute_path" and items["5"]["reason"] == "outside_input"
    rep = build("affectnet", root, tmp_path / "out2", allow_outside=True)
    assert rep["num_samples"] == 5 and rep["skipped_by_reason"] == {}


def test_rafdb_names_must_stay_inside_input(tmp_path):
    secret = _secret_outside(tmp_path)
    root = make_rafdb(tmp_path / "raf", n_train=2, n_test=0)
    os.makedirs(os.path.join(root, "Image", "aligned", "train_x"))
    # "train_x/../../../../outside/secret" + "_aligned.jpg": a path outside the dataset that exists
    os.symlink(secret, tmp_path / "outside" / "secret_aligned.jpg")
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "a") as f:
        f.write("train_x/../../../../outside/secret.jpg 1\n")
    rep = build("rafdb", root, tmp_path / "out", split="train")
    assert rep["num_samples"] == 2 and rep["skipped_by_reason"] == {"outside_input": 1}


def test_image_folder_links_hidden_files_and_loops(tmp_path):
    secret = _secret_outside(tmp_path)
    root = make_image_folder(tmp_path / "in", n_ids=2, per_id=2)
    os.symlink(secret, os.path.join(root, "id000", "evil.jpg"))                 # file link outside
    os.symlink(os.path.join(tmp_path, "outside"), os.path.join(root, "evil_id"))  # folder link outside
    os.symlink(os.path.join(root, "id001", "0000.jpg"), os.path.join(root, "id000", "alias.jpg"))  # inside: ok
    os.symlink(root, os.path.join(root, "id001", "loop"))                        # loop to the input itself
    for name in ("..jpg", "...jpg", ".hidden.jpg"):
        write(os.path.join(root, "id000", name), img_bytes(seed=5))
    os.makedirs(os.path.join(root, ".git"))
    rep = build("image-folder", root, tmp_path / "out")
    assert rep["num_samples"] == 5
    assert rep["skipped_by_reason"] == {"hidden_file": 4, "outside_input": 2, "symlink_loop": 1}
    hidden = sorted(os.path.basename(s["item"]) for s in rep["skipped"] if s["reason"] == "hidden_file")
    assert hidden == ["...jpg", "..jpg", ".git", ".hidden.jpg"]
    rep = build("image-folder", root, tmp_path / "out2", allow_outside=True)
    assert rep["num_samples"] == 7 and rep["skipped_by_reason"] == {"hidden_file": 4, "symlink_loop": 1}


def test_allow_outside_flag_on_the_cli(tmp_path, capsys):
    from sharding.cli import main

    secret = _secret_outside(tmp_path)
    root = make_image_folder(tmp_path / "in", n_ids=1, per_id=2)
    os.symlink(secret, os.path.join(root, "id000", "evil.jpg"))
    assert main(["build", "--format", "image-folder", "--input", root, "--output", str(tmp_path / "o"),
                 "--no-progress", "--workers", "1"]) == 0
    import json

    assert json.load(open(tmp_path / "o" / "report.json"))["skipped_by_reason"] == {"outside_input": 1}
    assert main(["build", "--format", "image-folder", "--input", root, "--output", str(tmp_path / "o2"),
                 "--no-progress", "--workers", "1", "--allow-outside"]) == 0
    assert json.load(open(tmp_path / "o2" / "report.json"))["num_samples"] == 3
    _ = UserError, pytest
