"""ssfer predict: a real photo (scikit-image's astronaut) through the Haar detector; a non-image file and a
face-less image are reported while the others are still processed; exit status."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from ssfer_dist.cli import main
from ssfer_dist.shards.schema import CLASS_NAMES
from ssfer_dist.predict import Predictor, crop_square
from tests.test_export import make_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("predict")
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    (d / "notes.txt").write_text("this is not an image\n")
    Image.new("RGB", (120, 90), (128, 128, 128)).save(d / "blank.jpg")
    make_weights(d / "model.safetensors", seed=5)
    return d


def test_astronaut_json_lines_and_bad_files(files, capsys):
    d = files
    rc = main(["predict", "--weights", str(d / "model.safetensors"), "--json", "--annotate", str(d / "ann"),
               str(d / "notes.txt"), str(d / "astronaut.png"), str(d / "blank.jpg")])
    assert rc == 0
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.strip().splitlines()]
    errors = {r["image"].rsplit("/", 1)[-1]: r["error"] for r in rows if "error" in r}
    faces = [r for r in rows if "error" not in r]
    assert "not a readable image" in errors["notes.txt"]
    assert "no face" in errors["blank.jpg"]
    assert "notes.txt" in cap.err and "blank.jpg" in cap.err
    assert len(faces) == 1
    f = faces[0]
    x1, y1, x2, y2 = f["box"]
    # Eileen Collins' face in the 512x512 astronaut picture
    assert 140 < (x1 + x2) / 2 < 260 and 40 < (y1 + y2) / 2 < 150 and 50 < x2 - x1 < 200
    assert set(f["probabilities"]) == set(CLASS_NAMES[:7])
    assert sum(f["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert f["label"] == max(f["probabilities"], key=f["probabilities"].get)
    with Image.open(d / "ann" / "astronaut.png") as im:
        assert im.size == (512, 512)


def test_table_output_and_nothing_done_exits_nonzero(files, capsys):
    d = files
    assert main(["predict", "--weights", str(d / "model.safetensors"), str(d)]) == 0  # a folder: images only
    out = capsys.readouterr().out
    assert "astronaut.png" in out and "label" in out
    assert main(["predict", "--weights", str(d / "model.safetensors"), str(d / "notes.txt"),
                 str(d / "blank.jpg")]) == 1
    assert main(["predict", "--weights", str(d / "missing.safetensors"), str(d / "blank.jpg")]) == 2


def test_wrong_class_count_weights_and_detector_none(files, tmp_path):
    from ssfer_dist.errors import UserError
    from ssfer_dist.models.io import classifier_from_weights

    make_weights(tmp_path / "eight.safetensors", num_classes=8)
    with pytest.raises(UserError, match="8 classes"):
        classifier_from_weights(str(tmp_path / "eight.safetensors"), num_classes=7)
    p = Predictor(str(files / "model.safetensors"), detector="none")
    img = Image.open(files / "blank.jpg").convert("RGB")
    res = p.predict(img)
    assert len(res) == 1 and res[0][0] == (0.0, 0.0, 120.0, 90.0)
    assert crop_square(img, (10, 10, 50, 30), 0.5).size == (60, 60)
