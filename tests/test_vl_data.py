"""Images in canonical rows: every accepted reference form, errors that name file, line and image, and builtin:shapes."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from lmforge.dataset import DatasetError, load_dataset, preprocess_row
from lmforge.dataset import media


def _png(path, size=(6, 4), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def _row(content="<image>What is this?", **extra):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red"}], **extra}


def test_every_reference_form_normalises_to_a_path_or_data_url(tmp_path):
    path = _png(tmp_path / "a.png")
    pil = Image.new("RGB", (5, 5), (0, 0, 255))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG")
    raw = buf.getvalue()
    b64 = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
    out = preprocess_row(_row("<image><image><image><image><image>x", images=[
        path, f"file://{path}", b64, pil, {"bytes": raw, "path": None}]))
    assert out["images"][:2] == [path, path]
    assert out["images"][2] == b64
    assert out["images"][3].startswith("data:image/png;base64,")
    assert out["images"][4] == b64  # raw bytes keep their own format: no re-encoding
    assert media.image_size(out["images"][3]) == (5, 5)
    assert media.open_image(out["images"][4]).size == (5, 5)
    assert preprocess_row(out) == out  # normalised rows map to themselves


def test_relative_paths_resolve_against_the_dataset_file(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    image = _png(tmp_path / "imgs" / "cat.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(_row(images=["imgs/cat.png"])) + "\n")
    monkeypatch.chdir("/")
    train, _ = load_dataset([str(data)], shuffle=False)
    assert train[0]["images"] == [image]


def test_llava_and_sharegpt_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = _png(tmp_path / "coco.jpg")
    raw = {"id": "1", "image": "coco.jpg",
           "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    out = preprocess_row(raw)
    assert out["images"] == [image] and out["messages"][0]["content"] == "<image>\nWhat colour?"
    assert "image" not in out and out["id"] == "1"
    parts = preprocess_row({"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "red"}]})
    assert parts["images"] == [image] and parts["messages"][0]["content"] == "<image>Hi"


def test_bad_images_name_file_line_and_image(tmp_path):
    good = _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("not an image")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (
        _row(images=[good]), _row(images=["missing.png"]), _row(images=["broken.png"]),
        _row(images=["https://example.com/x.png"]), _row("<image><image>two?", images=[good]))) + "\n")
    with pytest.raises(DatasetError) as e:
        load_dataset([str(data)], shuffle=False)
    assert f"{data}:2" in str(e.value) and "images[0]" in str(e.value) and "missing.png" in str(e.value)
    train, _ = load_dataset([str(data)], shuffle=False, strict=False)
    assert len(train) == 1  # the other four skipped and counted
    for raw, needle in ((_row(images=[str(tmp_path / "broken.png")]), "cannot read image"),
                        (_row(images=["https://example.com/x.png"]), "offline"),
                        (_row(images=["data:image/png;base64,@@@"]), "does not decode"),
                        (_row("<image><image>?", images=[good]), r"2 <image> tag\(s\) but the row has 1 images")):
        with pytest.raises(DatasetError, match=needle):
            preprocess_row(raw, source="f.jsonl:7")


def test_videos_are_lists_of_frames_or_video_files(tmp_path):
    frames = [_png(tmp_path / f"f{i}.png") for i in range(2)]
    out = preprocess_row(_row("<video>What happens?", videos=[frames]))
    assert out["videos"] == [frames] and out["images"] is None
    pytest.importorskip("av", reason="video files are decoded with PyAV")
    from tests.test_vl_video import write_mp4

    clip = write_mp4(tmp_path / "clip.mp4")
    (tmp_path / "d.jsonl").write_text("")  # a relative path is looked up beside the dataset file
    out = preprocess_row(_row("<video>?", video="clip.mp4"), source=f"{tmp_path / 'd.jsonl'}:3")
    assert out["videos"] == [[clip]]  # a file: one absolute path, decoded when a batch is built
    with pytest.raises(DatasetError, match=r"f\.jsonl:7: field 'video\[0\]': no such video file 'gone\.mp4'"):
        preprocess_row(_row("<video>?", video="gone.mp4"), source="f.jsonl:7")
    with pytest.raises(DatasetError, match="frames differ in size"):
        preprocess_row(_row("<video>?", videos=[[frames[0], _png(tmp_path / "big.png", size=(8, 8))]]))
    with pytest.raises(DatasetError, match="is not a video file"):
        preprocess_row(_row("<video>?", videos=[frames[0]]))


def test_builtin_shapes_is_deterministic_with_a_held_out_split():
    from lmforge.dataset.shapes import generate_shapes

    a, b = generate_shapes("test", n=40), generate_shapes("test", n=40)
    assert a == b
    train = generate_shapes("train", n=200)
    assert not {r["images"][0] for r in a} & {r["images"][0] for r in train}
    topics = {r["messages"][0]["content"].split(">")[1] for r in train}
    assert len(topics) == 6  # two phrasings each of colour, shape and count
    row = a[0]
    assert row["solution"] == row["messages"][1]["content"]
    assert media.image_size(row["images"][0]) == (84, 84)
    ds, _ = load_dataset(["builtin:shapes:test#5"], shuffle=False)
    assert len(ds) == 5 and ds[0]["images"][0].startswith("data:image/png")
