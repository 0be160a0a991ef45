"""Bad manifest rows: found at start-up where cheap, replaced and reported at run time, listed by validate.

A bad row must never stop a run for good (the rerun would draw it again) and never change how many
prompts a rank runs (ranks run the same FSDP collectives per forward): it is replaced by the next good
row in file order, a choice that depends on the file alone.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgrpo import data
from lgrpo.data import DataError, ManifestDataset


def _png(path: Path, colour, size=(28, 42)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the header reads fine; decoding runs out of data
    return path


def _bomb(path: Path) -> Path:
    """A PNG header claiming 100000 x 100000 pixels (no data): what a decompression bomb reads as."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


GOOD = 3  # lines 1..3 are good


@pytest.fixture
def manifest(tmp_path) -> Path:
    imgs = tmp_path / "imgs"
    for i in range(GOOD):
        _png(imgs / f"a{i}.png", (60 * i, 10, 10))
        _png(imgs / f"b{i}.png", (10, 60 * i, 10))
    _truncated_jpeg(imgs / "truncated.jpg")
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "garbage.png").write_bytes(b"this is not an image")
    _png(imgs / "long.png", (1, 2, 3), size=(300, 1))
    _bomb(imgs / "bomb.png")

    def row(prompt, a, b, preferred=1):
        return json.dumps({"prompt": prompt, "image_1": f"imgs/{a}", "image_2": f"imgs/{b}",
                           "preferred": preferred}).encode()

    lines = [row(f"good {i}", f"a{i}.png", f"b{i}.png", 1 + i % 2) for i in range(GOOD)]  # 1-3
    lines += [
        row("truncated", "truncated.jpg", "a0.png"),                       # 4: only decoding finds it
        row("empty file", "empty.png", "a0.png"),                          # 5
        row("garbage", "a0.png", "garbage.png"),                           # 6
        row("elongated", "long.png", "a0.png"),                            # 7: aspect ratio 300
        row("bomb", "bomb.png", "a0.png"),                                 # 8
        row("a <|image_pad|> in the text", "a0.png", "a1.png"),            # 9
        b'{"prompt": "caf\xe9", "image_1": "imgs/a0.png"}',                # 10: Latin-1, not UTF-8
        row("good again", "a1.png", "b1.png"),                             # 11
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


STARTUP_BAD = {5: "", 6: "", 7: "aspect ratio 300", 8: "pixels", 9: "<|image_pad|>", 10: "not UTF-8"}


def test_startup_checks_find_bad_rows_from_headers_and_text(manifest):
    ds = ManifestDataset(manifest, on_bad_row="skip")
    assert len(ds) == 11  # every line keeps its index: the data order survives a row going bad
    reasons = {ds.records[i].line: reason for i, reason in ds.bad.items()}
    assert set(reasons) == set(STARTUP_BAD)
    for line, words in STARTUP_BAD.items():
        assert words in reasons[line], (line, reasons[line])
    assert "byte 0xe9 at column" in reasons[10]
    with pytest.raises(DataError, match=r"m\.jsonl:5: image_1 unreadable"):
        ManifestDataset(manifest, on_bad_row="stop")


def test_a_bad_row_is_replaced_by_the_next_good_one_and_reported_once(manifest, tmp_path):
    ds = ManifestDataset(manifest, on_bad_row="skip")
    log = tmp_path / "run" / "bad_rows.jsonl"
    ds.log_bad_rows_to(log)
    assert sorted(json.loads(line)["line"] for line in log.read_text().splitlines()) == sorted(STARTUP_BAD)

    # Row 4's JPEG is truncated: only decoding finds it, when it is drawn. Rows 5-10 are known bad.
    assert ds.records[3].line == 4 and 3 not in ds.bad
    assert ds[3].prompt == "good again"
    assert ds[3].prompt == "good again"  # drawn again: the same replacement, reported once
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    late = [r for r in rows if r["line"] == 4]
    assert len(late) == 1 and "truncated" in late[0]["reason"] and late[0]["replaced_by"].endswith(":11")
    # The last row's successor wraps around to the first good row.
    assert ManifestDataset(manifest, on_bad_row="skip")[9].prompt == "good again"
    assert ds[10].prompt == "good again" and ds[0].prompt == "good 0"


def test_replacements_do_not_depend_on_the_rank_or_the_order_rows_are_drawn(manifest):
    """What 2 ranks draw (each its own share, in its own order) equals what 1 rank draws."""
    one = ManifestDataset(manifest, on_bad_row="skip")
    whole = [one[i] for i in range(len(one))]
    rank0, rank1 = ManifestDataset(manifest, on_bad_row="skip"), ManifestDataset(manifest, on_bad_row="skip")
    shares = {i: (rank1 if i % 2 else rank0)[i] for i in reversed(range(len(one)))}
    for i, ex in enumerate(whole):
        other = shares[i]
        assert (ex.prompt, ex.preferred) == (other.prompt, other.preferred)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ex.images, other.images))


def test_stop_names_a_row_that_fails_when_drawn(manifest, tmp_path):
    lines = manifest.read_bytes().splitlines()
    only_truncated = tmp_path / "t.jsonl"
    only_truncated.write_bytes(b"\n".join(lines[:4]) + b"\n")
    ds = ManifestDataset(only_truncated, on_bad_row="stop")
    with pytest.raises(DataError, match=r"t\.jsonl:4: cannot read image .*truncated"):
        ds[3]


def test_validate_reports_every_problem_with_its_line_and_never_crashes(manifest, capsys):
    assert data.main(["validate", str(manifest)]) == 1
    out = capsys.readouterr()
    lines = {int(line.split(":")[1]): line for line in out.out.strip().splitlines()}
    assert set(lines) == set(STARTUP_BAD) | {4}
    assert "truncated" in lines[4] and "pixels" in lines[8] and "aspect ratio" in lines[7]
    assert "not UTF-8" in lines[10] and "<|image_pad|>" in lines[9]
    assert "7 bad" in out.err


@pytest.mark.usefixtures("reference_kernels")
def test_training_goes_on_past_bad_rows_and_lists_them_in_the_run_folder(manifest, tmp_path):
    """`python -m lgrpo.train` on a manifest with bad rows: start-up finds some, drawing finds the
    truncated JPEG; each is replaced, the step runs all its prompts, and bad_rows.jsonl lists them."""
    from lgrpo.train import main

    lines = manifest.read_bytes().splitlines()
    five = tmp_path / "five.jsonl"  # rows 1-3 good, 4 truncated (found when drawn), 5 an empty file
    five.write_bytes(b"\n".join(lines[:5]) + b"\n")
    argv = ["--run.dir", str(tmp_path), "--run.name", "bad", "--run.progress", "false", "--sft.steps", "0",
            "--data.train", str(five), "--data.eval", "none", "--train.steps", "1",
            "--train.prompts_per_step", "5", "--rollout.group_size", "2", "--rollout.max_new_tokens", "4",
            "--checkpoint.export", "false"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "bad" / "bad_rows.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [4, 5]
    assert next(r for r in rows if r["line"] == 4)["replaced_by"].endswith(f"{five.name}:1")
    assert len((tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()) == 1

    with pytest.raises(DataError, match=r"five\.jsonl:5: image_1 unreadable"):
        main([*argv, "--run.name", "stop", "--data.on_bad_row", "stop"])
