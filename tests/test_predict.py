"""Prediction from image files: any size, PNG and JPEG, the same answer as evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.data.cpu_augment import normalize
from cifarlab.data.sources import load_source
from cifarlab.data.sources.images import ImageSet
from cifarlab.errors import UserError
from cifarlab.evaluate import evaluate
from cifarlab.predict import predict_files, to_model_input


@pytest.fixture(scope="module")
def best(trained_run):
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def training_images():
    return load_source("synthetic:300").train.images[:12]


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_top_class_is_what_evaluate_scores_as_correct(best, training_images, tmp_path):
    paths = []
    for i, pixels in enumerate(training_images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(pixels))
    ckpt = checkpoint.load(best)
    results = predict_files(best, paths, topk=len(ckpt["classes"]))
    for result in results:
        probs = [p for _, p in result.predictions]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
        assert sorted(c for c, _ in result.predictions) == sorted(ckpt["classes"])
    # Labelled with the predicted classes, the images are 100 % correct for evaluate.
    predicted = np.array([ckpt["classes"].index(r.predictions[0][0]) for r in results])
    scored = evaluate(checkpoint.build_model(ckpt), ImageSet(training_images, predicted,
                                                             ckpt["classes"]),
                      ckpt["mean"], ckpt["std"], torch.device("cpu"))
    assert scored.acc == 100.0


def test_a_flip_averaging_run_scores_and_predicts_with_mirror_images(best, training_images,
                                                                   tmp_path):
    ckpt = checkpoint.load(best)
    ckpt["config"]["tta_flip"] = True
    flipped = tmp_path / "flip.pt"
    torch.save(ckpt, flipped)
    model = checkpoint.build_model(ckpt)
    x = normalize(torch.from_numpy(training_images), ckpt["mean"], ckpt["std"])
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    assert not torch.allclose(plain, mirrored)  # the model is not flip-invariant already
    expected = ((plain + mirrored) / 2).softmax(1)
    path = tmp_path / "0.png"
    path.write_bytes(png_bytes(training_images[0]))
    (result,) = predict_files(flipped, [path], topk=1)
    top_class, top_p = result.predictions[0]
    assert top_p == pytest.approx(expected[0].max().item(), abs=1e-5)
    assert ckpt["classes"].index(top_class) == expected[0].argmax().item()
    # evaluate: the accuracy of the averaged logits, which differs from the plain one here.
    labels = ((plain + mirrored) / 2).argmax(1).numpy()
    images = ImageSet(training_images, labels, ckpt["classes"])
    device = torch.device("cpu")
    assert evaluate(model, images, ckpt["mean"], ckpt["std"], device, flip=True).acc == 100.0
    plain_acc = 100.0 * (plain.argmax(1).numpy() == labels).mean()
    plain_score = evaluate(model, images, ckpt["mean"], ckpt["std"], device)
    assert plain_score.acc == pytest.approx(plain_acc)
    # The losses tell the two apart even where every argmax agrees.
    y = torch.from_numpy(labels)
    assert plain_score.loss == pytest.approx(F.cross_entropy(plain, y).item(), rel=1e-4)
    flip_loss = evaluate(model, images, ckpt["mean"], ckpt["std"], device, flip=True).loss
    assert flip_loss == pytest.approx(F.cross_entropy((plain + mirrored) / 2, y).item(),
                                      rel=1e-4)
    assert flip_loss != pytest.approx(plain_score.loss, rel=1e-4)


def test_images_of_any_size_become_the_centre_32x32():
    # A 96x32 image of three colour bands: the centre crop is the middle (green) band.
    bands = np.zeros((32, 96, 3), np.uint8)
    bands[:, :32, 0] = bands[:, 32:64, 1] = bands[:, 64:, 2] = 255
    out = to_model_input("bands.png", png_bytes(bands))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, 4:-4, 1] == 255).all() and (out[:, 4:-4, [0, 2]] == 0).all()
    # Larger images are shrunk (shorter side to 32), smaller ones enlarged; grey becomes RGB.
    big = to_model_input("big.jpg", png_bytes(np.full((300, 200, 3), 200, np.uint8), "JPEG"))
    assert big.shape == (32, 32, 3) and abs(int(big.mean()) - 200) <= 2
    grey = Image.new("L", (10, 7), 90)
    small = to_model_input("small.png", png_bytes(np.asarray(grey)))
    assert small.shape == (32, 32, 3) and (small == 90).all()


def test_predict_command_json_on_png_and_jpeg(best, training_images, tmp_path, capsys):
    png, jpeg = tmp_path / "a.png", tmp_path / "b.jpeg"
    png.write_bytes(png_bytes(training_images[0]))
    big = np.asarray(Image.fromarray(training_images[1]).resize((200, 130)))
    jpeg.write_bytes(png_bytes(big, "JPEG"))
    assert main(["predict", str(best), str(png), str(jpeg), "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == [str(png), str(jpeg)]
    for r in out:
        assert len(r["predictions"]) == 2 and set(r["predictions"][0]) == {"class", "probability"}
        assert 0 <= r["predictions"][1]["probability"] <= r["predictions"][0]["probability"] <= 1
    assert main(["predict", str(best), str(png), "--topk", "50"]) == 0  # clamped to 10 classes
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(png) and len(lines) == 11 and lines[1].endswith("%")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "no such image file"),
    (lambda d: (d / "x.png").write_bytes(b"no image") and d / "x.png", "cannot decode image"),
    (lambda d: (d / "e.jpg").write_bytes(b"") or d / "e.jpg", "cannot decode image (empty file)"),
])
def test_bad_image_files_are_one_line_exit_2(best, tmp_path, capsys, make, message):
    assert main(["predict", str(best), str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def fifo(folder):
    os.mkfifo(folder / "pipe.png")  # reading it would wait for a writer forever
    return folder / "pipe.png"


@pytest.mark.parametrize("make", [fifo, lambda d: (d / "dir.png").mkdir() or d / "dir.png",
                                  lambda d: Path("/dev/zero")])
def test_what_is_not_a_regular_file_is_refused_before_it_is_read(best, tmp_path, capsys, make):
    assert main(["predict", str(best), str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and err.count("\n") == 1


def test_a_fifo_in_an_image_folder_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    fifo(tmp_path / "cat")
    with pytest.raises(UserError, match="pipe.png: not a regular file"):
        load_source(str(tmp_path))


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(best, tmp_path, capsys,
                                                                  monkeypatch):
    image = tmp_path / "wide.png"
    image.write_bytes(png_bytes(np.zeros((10, 200, 3), np.uint8)))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1999)
    assert main(["predict", str(best), str(image)]) == 2
    err = capsys.readouterr().err
    assert "200x10 (2,000 pixels), over the 1,999 pixels" in err and err.count("\n") == 1
    assert decoded == []  # refused before the pixels were decoded


def test_a_long_strip_is_never_scaled_whole(monkeypatch):
    # Shorter side to 32 would make this 100,000 x 4 strip 800,000 x 32 before the crop.
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: (
        sizes.append(size), real_resize(self, size, *a, **k))[1])
    strip = np.zeros((4, 100_000, 3), np.uint8)
    strip[:, 50_000 - 1 : 50_000 + 1] = 255  # a white line at the centre
    out = to_model_input("strip.png", png_bytes(strip))
    assert sizes == [(32, 32)] and out.shape == (32, 32, 3)
    assert out[:, 14:18].min() > 200 and out[:, :4].max() == 0  # the centre, not the edge


def test_bad_topk_and_checkpoint(best, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(UserError, match="--topk 0"):
        predict_files(best, [image], topk=0)
    with pytest.raises(UserError, match="not a readable cifarlab checkpoint"):
        predict_files(image, [image])
