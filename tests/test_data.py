"""Manifests, bad-row handling, the converters (small fixtures of each layout), the CLI, iteration order,
and the synthetic task."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgrpo import data
from lgrpo.data import DataError, ManifestDataset, PromptOrder, convert, read_manifest
from lgrpo.prompts import parse_completion
from lgrpo.synthetic import COLOURS, SHAPES, SyntheticTask, reference_completion, render


def _pyarrow():
    """pyarrow (the [data] extra) imported by the tests that write Parquet, not by the module: without it
    those tests skip, while a module-level import would stop the collection of the whole session
    (`pytest -m gpu tests` collects this file too, and then runs nothing)."""
    pa = pytest.importorskip("pyarrow")
    return pa, pytest.importorskip("pyarrow.parquet")


def _png(path: Path, colour=(200, 10, 10), size=(28, 42)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# -- manifest ------------------------------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):
    return [_png(tmp_path / "imgs" / f"{i}.png", (40 * i, 10, 10)) for i in range(4)]


def _write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_manifest_relative_and_absolute_paths(tmp_path, images):
    m = _write_lines(tmp_path / "m.jsonl", [
        {"prompt": "a", "image_1": "imgs/0.png", "image_2": str(images[1]), "preferred": 2, "id": "x",
         "votes": [1, 5]},
        {"prompt": "b", "image_1": "imgs/2.png", "image_2": "imgs/3.png", "preferred": 1},
    ])
    ds = ManifestDataset(m)
    assert len(ds) == 2 and ds.report.bad == [] and ds.report.kept == 2
    ex = ds[0]
    assert (ex.prompt, ex.preferred, ex.id) == ("a", 2, "x")
    assert ds.records[0].votes == (1, 5)
    np.testing.assert_array_equal(_pixels(ex.images[0]), _pixels(Image.open(images[0])))
    np.testing.assert_array_equal(_pixels(ex.images[1]), _pixels(Image.open(images[1])))


def _bad_manifest(tmp_path, images) -> Path:
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = {"prompt": "ok", "image_1": "imgs/0.png", "image_2": "imgs/1.png", "preferred": 1}
    return _write_lines(tmp_path / "bad.jsonl", [
        good,                                                       # line 1
        "{not json",                                                # line 2
        {**good, "prompt": "  "},                                   # line 3
        {**good, "preferred": 3},                                   # line 4
        {**good, "image_2": "imgs/missing.png"},                    # line 5
        "",                                                         # line 6: blank, ignored
        {**good, "image_1": "imgs/corrupt.png"},                    # line 7: only decoding finds it
        {**good, "preferred": True},                                # line 8
        {**good, "votes": [1]},                                     # line 9
        good,                                                       # line 10
    ])


def test_bad_row_raises_naming_file_and_line(tmp_path, images):
    m = _bad_manifest(tmp_path, images)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_manifest(m)


def test_skip_bad_lists_every_bad_row(tmp_path, images):
    m = _bad_manifest(tmp_path, images)
    records, report = read_manifest(m, skip_bad=True)
    lines = [b.line for b in report.bad]
    assert lines == [2, 3, 4, 5, 8, 9]
    reasons = {b.line: b.reason for b in report.bad}
    assert "prompt" in reasons[3] and "preferred" in reasons[4] and "not found" in reasons[5]
    assert [r.line for r in records] == [1, 7, 10]
    assert (report.rows, report.kept) == (9, 3)
    assert "6 bad" in report.summary() and len(re.findall(r"bad\.jsonl:\d+: ", str(report))) == 6

    records, report = read_manifest(m, skip_bad=True, decode_images=True)
    assert [b.line for b in report.bad] == [2, 3, 4, 5, 7, 8, 9]
    assert "unreadable" in report.bad[4].reason


def test_decode_error_at_load_names_the_row(tmp_path, images):
    m = _bad_manifest(tmp_path, images)
    ds = ManifestDataset(m, skip_bad=True, check_images="exists")
    assert [r.line for r in ds.records] == [1, 7, 10]
    with pytest.raises(DataError, match=r"bad\.jsonl:7: cannot read image"):
        ds[1]
    # By default the image headers are read at start-up: the corrupt PNG is found there.
    assert [r.line for r in ManifestDataset(m, skip_bad=True).records] == [1, 10]


def test_manifest_without_usable_rows_is_an_error(tmp_path):
    m = _write_lines(tmp_path / "m.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match="no usable rows"):
        ManifestDataset(m, skip_bad=True)
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "absent.jsonl")


def _validate(manifest: Path):
    return subprocess.run([sys.executable, "-m", "lgrpo.data", "validate", str(manifest)],
                          capture_output=True, text=True, timeout=120)


def test_validate_cli_reports_each_bad_row_and_fails(tmp_path, images):
    m = _bad_manifest(tmp_path, images)
    res = _validate(m)
    assert res.returncode == 1
    out = res.stdout.strip().splitlines()
    assert [line.split(":")[1] for line in out] == ["2", "3", "4", "5", "7", "8", "9"]
    assert all(line.startswith(f"{m}:") for line in out)
    assert "unreadable" in out[4]
    assert "7 bad" in res.stderr


def test_validate_cli_passes_a_good_manifest(tmp_path):
    m = SyntheticTask(seed=1).write(tmp_path, "heldout", 3)
    assert data.main(["validate", str(m)]) == 0
    assert data.main(["validate", str(tmp_path / "absent.jsonl")]) == 2


# -- converters ----------------------------------------------------------------------------------------

def _image_bytes(colour, fmt="PNG", size=(30, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _rapidata_table(vote_cols=("votes_image1", "votes_image2")):
    rows = [
        ("a cat", _image_bytes((255, 0, 0)), _image_bytes((0, 255, 0), "JPEG"), 7, 3),    # 1 preferred
        ("a dog", _image_bytes((0, 0, 255)), _image_bytes((9, 9, 9)), 2, 11),             # 2 preferred
        ("a tie", _image_bytes((1, 1, 1)), _image_bytes((2, 2, 2)), 4, 4),                # dropped: tie
        ("bad bytes", b"not an image", _image_bytes((3, 3, 3)), 1, 0),                    # bad row
        ("", _image_bytes((4, 4, 4)), _image_bytes((5, 5, 5)), 0, 1),                     # bad: empty prompt
    ]
    struct = lambda b, name: {"bytes": b, "path": name}
    pa, _ = _pyarrow()
    return pa.table({
        "prompt": [r[0] for r in rows],
        "image1": [struct(r[1], f"m1/{i}.png") for i, r in enumerate(rows)],
        "image2": [struct(r[2], f"m2/{i}.jpg") for i, r in enumerate(rows)],
        vote_cols[0]: [r[3] for r in rows],
        vote_cols[1]: [r[4] for r in rows],
        "model1": ["flux"] * len(rows),
        "model2": ["sd3"] * len(rows),
    }), rows


def test_convert_rapidata_parquet(tmp_path):
    table, rows = _rapidata_table()
    _, pq = _pyarrow()
    src = tmp_path / "src" / "train_0001.parquet"
    src.parent.mkdir()
    pq.write_table(table, src, row_group_size=2)
    dst = tmp_path / "out" / "rapidata.jsonl"

    with pytest.raises(DataError, match=r"train_0001\.parquet:4: image1 bytes are not an image"):
        convert("rapidata", src, dst)
    assert not dst.exists()  # no half-written manifest

    report = convert("rapidata", src.parent, dst, skip_bad=True)  # a folder of parquet files works too
    assert (report.rows, report.kept, report.dropped) == (5, 2, {"tie": 1})
    assert [(b.line, b.reason.split(" ")[0]) for b in report.bad] == [(4, "image1"), (5, "empty")]
    ds = ManifestDataset(dst)
    assert [(ex.prompt, ex.preferred) for ex in (ds[0], ds[1])] == [("a cat", 1), ("a dog", 2)]
    assert ds.records[1].votes == (2.0, 11.0)
    assert ds.records[0].image_2.suffix == ".jpg" and ds.records[0].image_1.suffix == ".png"
    assert ds.records[0].image_1.parent == (tmp_path / "out" / "rapidata_images").resolve()
    # Bytes are copied as they were: the PNG decodes to the original pixels.
    assert ds.records[0].image_1.read_bytes() == rows[0][1]
    assert json.loads(dst.read_text().splitlines()[0])["image_1"].startswith("rapidata_images/")


def test_convert_rapidata_weighted_results_columns(tmp_path):
    table, _ = _rapidata_table(("weighted_results_image1_alignment", "weighted_results_image2_alignment"))
    src = tmp_path / "w.parquet"
    _, pq = _pyarrow()
    pq.write_table(table, src)
    with pytest.raises(DataError, match="no vote columns"):
        convert("rapidata", src, tmp_path / "x.jsonl")
    report = convert("rapidata", src, tmp_path / "w.jsonl", criterion="alignment", skip_bad=True, limit=1)
    assert report.kept == 1 and len((tmp_path / "w.jsonl").read_text().splitlines()) == 1


def test_convert_hpdv2_json(tmp_path):
    root = tmp_path / "HPDv2"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        _png(root / "train" / name)
    entries = [
        {"prompt": "p1", "file_path": ["train/a.jpg", "train/b.jpg"], "human_preference": [0, 1]},
        {"prompt": "p2", "file_path": ["train/c.jpg", "train/a.jpg"], "human_preference": [1, 0]},
        {"prompt": "p3", "file_path": ["train/a.jpg", "train/b.jpg"], "human_preference": [1, 1]},   # bad
        {"prompt": "p4", "file_path": ["train/a.jpg", "train/zz.jpg"], "human_preference": [1, 0]},  # missing
        {"prompt": "p5", "image_path": ["train/c.jpg", "train/d.jpg", "train/e.jpg"], "rank": [2, 1, 3]},
    ]
    src = tmp_path / "meta" / "train.json"
    src.parent.mkdir()
    src.write_text(json.dumps(entries))
    dst = tmp_path / "hpd.jsonl"
    with pytest.raises(DataError, match=r"train\.json:3: human_preference"):
        convert("hpdv2", src, dst, image_root=root)
    report = convert("hpdv2", src, dst, image_root=root, skip_bad=True)
    assert [b.line for b in report.bad] == [3, 4] and "not found" in report.bad[1].reason
    records, _ = read_manifest(dst)
    got = [(r.prompt, r.image_1.name, r.image_2.name, r.preferred) for r in records]
    assert got == [("p1", "a.jpg", "b.jpg", 2), ("p2", "c.jpg", "a.jpg", 1),
                   ("p5", "c.jpg", "d.jpg", 2), ("p5", "c.jpg", "e.jpg", 1), ("p5", "d.jpg", "e.jpg", 1)]


def test_convert_imagereward_ranked_lists_jsonl(tmp_path):
    for name in ("g0.png", "g1.png", "g2.png", "g3.png"):
        _png(tmp_path / "imgs" / name)
    src = tmp_path / "ir.jsonl"  # JSONL works as well as a JSON list
    _write_lines(src, [
        {"id": "q1", "prompt": "a castle", "generations": [f"imgs/g{i}.png" for i in range(4)],
         "ranking": [3, 1, 3, 2]},
        {"id": "q2", "prompt": "a boat", "generations": ["imgs/g0.png"], "ranking": [1]},  # bad: one image
    ])
    dst = tmp_path / "ir_out.jsonl"
    assert data.main(["convert", "--from", "imagereward", str(src), str(dst)]) == 1  # stops on the bad row
    assert data.main(["convert", "--from", "imagereward", "--skip-bad", str(src), str(dst)]) == 0
    records, _ = read_manifest(dst)
    # 4 images -> 6 pairs, one tie (ranks 3 and 3) dropped; the lower rank number wins.
    got = {(r.image_1.stem, r.image_2.stem): r.preferred for r in records}
    assert got == {("g0", "g1"): 2, ("g0", "g3"): 2, ("g1", "g2"): 1, ("g1", "g3"): 1, ("g2", "g3"): 2}
    assert {r.id for r in records} == {"q1:0-1", "q1:0-3", "q1:1-2", "q1:1-3", "q1:2-3"}


def test_convert_rejects_unknown_format_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        convert("laion", tmp_path, tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError):
        convert("hpdv2", tmp_path / "nope.json", tmp_path / "x.jsonl")


# -- iteration order -----------------------------------------------------------------------------------

def test_prompt_order_is_a_seeded_permutation_per_epoch():
    order = PromptOrder(10, 4, seed=3)
    draws = [order.next() for _ in range(5)]  # 20 prompts = 2 epochs
    flat = sum((idx for idx, _ in draws), [])
    assert sorted(flat[:10]) == list(range(10)) == sorted(flat[10:])
    assert flat[:10] != flat[10:]  # a new order each epoch
    assert order.state_dict() == {"epoch": 2, "offset": 0, "n": 10}
    again = PromptOrder(10, 4, seed=3)
    assert [again.next() for _ in range(5)] == draws
    assert PromptOrder(10, 10, seed=4).next() != PromptOrder(10, 10, seed=3).next()
    with pytest.raises(ValueError, match="holds no prompts"):
        PromptOrder(0, 4, seed=0)


def test_prompt_order_resumes_exactly():
    straight = PromptOrder(7, 3, seed=0)
    expected = [straight.next() for _ in range(4)]
    a = PromptOrder(7, 3, seed=0)
    head = [a.next()]
    b = PromptOrder(7, 3, seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a checkpoint round trip
    assert head + [b.next() for _ in range(3)] == expected
    with pytest.raises(ValueError, match="over 7 prompts, the data now holds 8"):
        PromptOrder(8, 3, seed=0).load_state_dict(a.state_dict())


def test_swaps_are_balanced_and_labels_follow():
    _, swaps = PromptOrder(2000, 2000, seed=0).next()
    assert 900 < sum(swaps) < 1100
    assert not any(PromptOrder(50, 50, seed=0, swap=False).next()[1])

    task = SyntheticTask(seed=0)
    ds = task.dataset("train", 40)
    for i, swapped in zip(*PromptOrder(len(ds), 40, seed=1).next()):
        original = ds[i]
        ex = original.swapped() if swapped else original
        assert ex.preferred == (3 - original.preferred if swapped else original.preferred)
        # The preferred image is still the one that shows the prompt.
        assert ex.captions[ex.preferred - 1] == ex.prompt
        np.testing.assert_array_equal(_pixels(ex.images[ex.preferred - 1]),
                                      _pixels(original.images[original.preferred - 1]))


# -- synthetic task ------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = SyntheticTask(seed=0), SyntheticTask(seed=0)
    for i in (0, 5, 123):
        ea, eb = a.example("train", i), b.example("train", i)
        assert (ea.prompt, ea.preferred, ea.captions) == (eb.prompt, eb.preferred, eb.captions)
        for x, y in zip(ea.images, eb.images):
            np.testing.assert_array_equal(_pixels(x), _pixels(y))
    train, held = set(a.configurations("train")), set(a.configurations("heldout"))
    assert train and held and not train & held
    assert len(train | held) == len(COLOURS) * len(SHAPES) * (len(COLOURS) * len(SHAPES) - 1)
    assert set(SyntheticTask(seed=1).configurations("heldout")) != held
    with pytest.raises(ValueError, match="split"):
        a.example("test", 0)


def test_synthetic_pairs_have_the_right_winner():
    task = SyntheticTask(seed=0)
    positions = []
    for i in range(60):
        ex = task.example("heldout", i)
        positions.append(ex.preferred)
        assert ex.captions[ex.preferred - 1] == ex.prompt != ex.captions[2 - ex.preferred]
        assert ex.images[0].size == (56, 56)
        # The winner's dominant non-background colour is the prompt's colour.
        colour = ex.prompt.split()[1]
        pix = _pixels(ex.images[ex.preferred - 1]).reshape(-1, 3)
        assert (np.abs(pix - np.array(COLOURS[colour])).sum(1) < 10).sum() > 100
    assert 15 < positions.count(1) < 45


def test_reference_completion_is_well_formed_and_correct():
    ex = SyntheticTask(seed=0).example("train", 7)
    for e in (ex, ex.swapped()):
        p = parse_completion(reference_completion(e))
        assert p.format_ok and p.answer == e.preferred
        assert f"image 1 shows {e.captions[0]}" in p.reasoning


def test_synthetic_manifest_round_trip(tmp_path):
    task = SyntheticTask(seed=2)
    m = task.write(tmp_path, "train", 4)
    ds = ManifestDataset(m, decode_images=True)
    for i in range(4):
        ex, orig = ds[i], task.example("train", i)
        assert (ex.prompt, ex.preferred, ex.id) == (orig.prompt, orig.preferred, orig.id)
        np.testing.assert_array_equal(_pixels(ex.images[1]), _pixels(orig.images[1]))


def test_render_rejects_unknown_shape():
    with pytest.raises(ValueError, match="shape"):
        render("red", "hexagon")
