"""The training text as byte tokens, with a deterministic train/validation split and a content hash.

The embedded default corpus is the source of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, ``*.py``, sorted paths, skipping ``site-packages``/``dist-packages``,
test folders and caches): it needs no download. ``DataConfig.path`` replaces it with a UTF-8 text file or a
folder of text files (sorted paths; hidden entries skipped; files that are not UTF-8 are skipped and listed).

Files are read in path order until ``max_bytes`` bytes are read (the file crossing the cap is cut). File ``i``
goes to validation when ``i % val_every == val_every - 1``; with fewer than ``val_every`` files the last
``1/val_every`` of the bytes is validation instead. Tokens are the raw bytes (uint8, vocabulary 256).
"""
from __future__ import annotations

import codecs
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from launch.config import DataConfig
from launch.errors import LaunchError

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """``train`` and ``val``: 1-D uint8 token tensors. ``info``: source, per-file split, sizes and sha256."""

    train: torch.Tensor
    val: torch.Tensor
    info: dict[str, Any]


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files under ``root`` in sorted order, without tests and site-packages
    (skipped folders are pruned from the walk, which keeps startup fast with a large site-packages)."""
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP_DIRS]
        found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(p for p in found if p.is_file())


def text_files(path: Path) -> list[Path]:
    """``[path]`` for a file; for a folder, its regular files in sorted order, skipping hidden entries."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LaunchError(f"data path {path} does not exist")
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _is_utf8_prefix(data: bytes) -> bool:
    """True if ``data`` is UTF-8, allowing an incomplete character at the end (where the size cap cut it)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _read(
    files: list[Path], root: Path, max_bytes: int, single_file: bool
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """``(kept (relative path, bytes), skipped relative paths)``, reading at most ``max_bytes`` in total."""
    kept: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    budget = max_bytes
    for path in files:
        if budget == 0:
            break
        with open(path, "rb") as handle:
            data = handle.read(budget)
        name = path.name if single_file else path.relative_to(root).as_posix()
        if not _is_utf8_prefix(data):
            if single_file:
                raise LaunchError(f"data file {path} is not UTF-8 text")
            skipped.append(name)
        elif data:
            kept.append((name, data))
            budget -= len(data)
    return kept, skipped


def _split(docs: list[tuple[str, bytes]], val_every: int) -> tuple[bytes, bytes, list[dict[str, Any]]]:
    """``(train bytes, val bytes, per-file records)`` by the file rule, or the byte-tail rule for few files."""
    if len(docs) >= val_every:
        is_val = [i % val_every == val_every - 1 for i in range(len(docs))]
        train = b"".join(d for (_, d), v in zip(docs, is_val) if not v)
        val = b"".join(d for (_, d), v in zip(docs, is_val) if v)
        records = [{"path": n, "bytes": len(d), "split": "val" if v else "train"} for (n, d), v in zip(docs, is_val)]
        return train, val, records
    stream = b"".join(d for _, d in docs)
    cut = len(stream) - len(stream) // val_every
    records = [{"path": n, "bytes": len(d), "split": "train+val tail"} for n, d in docs]
    return stream[:cut], stream[cut:], records


def corpus_sha256(train: bytes, val: bytes) -> str:
    """sha256 of the split token streams: 8-byte little-endian train length, train bytes, then val bytes."""
    digest = hashlib.sha256(len(train).to_bytes(8, "little"))
    digest.update(train)
    digest.update(val)
    return digest.hexdigest()


def _tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(cfg: DataConfig, stdlib_root: Optional[Path] = None) -> Corpus:
    """Reads and splits the corpus ``cfg`` names (``stdlib_root`` overrides the interpreter's stdlib path)."""
    if cfg.path is None:
        root = Path(stdlib_root or sysconfig.get_paths()["stdlib"])
        files, source = stdlib_files(root), f"python stdlib ({root})"
    else:
        root = Path(cfg.path)
        files, source = text_files(root), str(root)
    docs, skipped = _read(files, root, cfg.max_bytes, single_file=root.is_file())
    if not docs:
        raise LaunchError(f"no UTF-8 text found in {source}")
    train, val, records = _split(docs, cfg.val_every)
    info = {
        "source": source,
        "max_bytes": cfg.max_bytes,
        "val_every": cfg.val_every,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "sha256": corpus_sha256(train, val),
        "files": records,
        "skipped_not_utf8": skipped,
    }
    return Corpus(train=_tokens(train), val=_tokens(val), info=info)
