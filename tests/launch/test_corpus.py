"""The corpus: file selection, the deterministic split rules, the size cap and the recorded sha256."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from launch.config import DataConfig
from launch.corpus import load_corpus, stdlib_files
from launch.errors import LaunchError


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _sha(train: bytes, val: bytes) -> str:
    return hashlib.sha256(len(train).to_bytes(8, "little") + train + val).hexdigest()


def test_stdlib_selection_skips_tests_site_packages_and_other_files(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "b.py": b"b", "a.py": b"a", "pkg/c.py": b"c", "test/t.py": b"t", "pkg/tests/u.py": b"u",
        "site-packages/x.py": b"x", "__pycache__/z.py": b"z", "notes.txt": b"n", "idlelib/idle_test/i.py": b"i",
    })
    assert [p.relative_to(root).as_posix() for p in stdlib_files(root)] == ["a.py", "b.py", "pkg/c.py"]


def test_file_split_every_nth_file_to_validation(tmp_path: Path) -> None:
    docs = {f"m{i}.py": f"# module {i}\n".encode() * (i + 1) for i in range(7)}
    root = _write(tmp_path, docs)
    corpus = load_corpus(DataConfig(val_every=3), stdlib_root=root)
    ordered = [docs[f"m{i}.py"] for i in range(7)]
    train = b"".join(d for i, d in enumerate(ordered) if i % 3 != 2)
    val = ordered[2] + ordered[5]
    assert bytes(corpus.train.tolist()) == train and bytes(corpus.val.tolist()) == val
    assert [r["split"] for r in corpus.info["files"]] == ["train", "train", "val"] * 2 + ["train"]
    assert corpus.info["sha256"] == _sha(train, val)
    assert (corpus.info["train_tokens"], corpus.info["val_tokens"]) == (len(train), len(val))


def test_real_stdlib_corpus_is_deterministic_and_capped() -> None:
    cfg = DataConfig(max_bytes=50_000, val_every=4)
    first, second = load_corpus(cfg), load_corpus(cfg)
    assert first.info == second.info
    assert first.train.numel() + first.val.numel() == 50_000
    assert all(r["path"].endswith(".py") and "test" not in r["path"].split("/")[:-1] for r in first.info["files"])
    assert first.info["sha256"] == _sha(bytes(first.train.tolist()), bytes(first.val.tolist()))
    assert load_corpus(DataConfig(max_bytes=40_000, val_every=4)).info["sha256"] != first.info["sha256"]


def test_data_folder_skips_hidden_and_non_utf8_files(tmp_path: Path) -> None:
    root = _write(tmp_path / "texts", {"a.txt": "héllo\n".encode(), "sub/b.md": b"world\n", ".hidden/c.txt": b"no",
                                        "blob.bin": b"\xff\xfe\x00binary"})
    corpus = load_corpus(DataConfig(path=str(root), val_every=2))
    assert [r["path"] for r in corpus.info["files"]] == ["a.txt", "sub/b.md"]
    assert corpus.info["skipped_not_utf8"] == ["blob.bin"]
    assert bytes(corpus.train.tolist()) == "héllo\n".encode() and bytes(corpus.val.tolist()) == b"world\n"


def test_single_file_uses_the_byte_tail_split_and_the_cap(tmp_path: Path) -> None:
    text = ("line of text number %d\n" % 1).encode() * 100
    path = tmp_path / "one.txt"
    path.write_bytes(text)
    corpus = load_corpus(DataConfig(path=str(path), val_every=10))
    tail = len(text) // 10
    assert bytes(corpus.train.tolist()) == text[:-tail] and bytes(corpus.val.tolist()) == text[-tail:]
    capped = load_corpus(DataConfig(path=str(path), max_bytes=1000, val_every=10))
    assert capped.train.numel() + capped.val.numel() == 1000


def test_a_cap_inside_a_multibyte_character_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "u.txt"
    path.write_text("ééééé", encoding="utf-8")  # 10 bytes; a cap of 3 cuts the second character
    info = load_corpus(DataConfig(path=str(path), max_bytes=3)).info
    assert info["train_tokens"] + info["val_tokens"] == 3


@pytest.mark.parametrize(
    "files, target, needle",
    [
        ({}, "missing", "does not exist"),
        ({"bad.txt": b"\xff\xfe\xfa"}, "bad.txt", "is not UTF-8 text"),
        ({"empty/.keep": b""}, "empty", "no UTF-8 text found"),
    ],
)
def test_bad_data_paths(tmp_path: Path, files: dict, target: str, needle: str) -> None:
    _write(tmp_path, files)
    with pytest.raises(LaunchError, match=needle):
        load_corpus(DataConfig(path=str(tmp_path / target)))
