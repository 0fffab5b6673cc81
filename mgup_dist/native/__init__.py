"""Native CPU kernels (`count_pass.c`: the counting pass of MGUP's selection; `select_kernels.c`: its other
passes; `sampled_select.c`: the whole sampled selection of one tensor in one call; `update_kernels.c`: elementwise
update steps), built with the system C compiler on first use.

`library()` returns the loaded `ctypes.CDLL`, or None when the kernels are unavailable; callers then take the
portable numpy/torch path, which gives bit-identical masks. The build runs once per machine and source version:
``$CC`` (default ``cc``) compiles the sources into one library with ``-O3 -ffp-contract=off`` (no FMA
contraction, so an element's arithmetic never depends on its position), ``-fno-math-errno`` (so ``sqrtf`` is the
vector instruction; the kernels never read errno) and ``-fopenmp`` (torch is imported first, so the library binds to
the libgomp torch loaded and its parallel passes run on torch's intra-op thread team), plus ``-mavx2 -mfma
-mpopcnt`` on x86 CPUs where torch dispatches to AVX2 or AVX-512 (`isa_flags`), into ``<cache>/mgup_dist/native-<hash>/``, where ``<cache>`` is
``$MGUP_DIST_CACHE``, else ``$XDG_CACHE_HOME``, else ``~/.cache``, and ``<hash>`` covers the sources and header, the flags,
the compiler and the machine type. Each process compiles into a private temporary file and renames it into
place, so concurrent ranks or test workers never load a half-written library.

``MGUP_DIST_NATIVE``: ``auto`` (the default: use the kernels when they build, else log one warning and fall
back), ``0`` (never use them), ``1`` (require them: `NativeUnavailableError` when they cannot be built).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger("mgup_dist.native")

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("count_pass.c", "select_kernels.c", "sampled_select.c", "update_kernels.c")
)
HEADER = Path(__file__).with_name("kernels.h")
FLAGS = (
    "-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
    "-Werror=implicit-function-declaration",
)
MODES = ("auto", "0", "1")

_i64, _f32, _f64, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p
SIGNATURES = {
    "mgup_count_band": (
        None, [_ptr, _ptr, _ptr, _ptr, _f32, _ptr, _i64, _f32, _f32, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64]
    ),
    "mgup_fill_mask": (None, [_ptr, _ptr, _i64, _f32, _i64, _ptr, _i64]),
    "mgup_locate_ties": (_i64, [_ptr, _ptr, _i64, _f32, _i64, _ptr]),
    "mgup_mark_ties": (_i64, [_ptr, _ptr, _i64, _f32, _i64, _ptr, _i64]),
    "mgup_scaled_update": (None, [_ptr, _ptr, _i64, _ptr, _i64, _i64, _f32, _f32, _f32, _f32, _i64]),
    "mgup_momentum": (None, [_ptr, _ptr, _ptr, _i64, _f32, _i64]),
    "mgup_adam_direction": (None, [_ptr, _ptr, _ptr, _ptr, _i64, _f32, _ptr, _i64]),
    "mgup_order_statistics": (None, [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64]),
    "mgup_topk_small": (_i64, [_ptr, _ptr, _ptr, _ptr, _f32, _ptr, _i64, _i64, _ptr, _ptr]),
    "mgup_first_bracket": (None, [_ptr, _i64, _i64, _i64, _f64, _ptr, _ptr, _ptr, _i64]),
    "mgup_select_sampled": (_i64, [_ptr, _ptr, _ptr, _ptr, _f32, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64,
                                   _i64, _f64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64]),
    "mgup_settle_band": (None, [_ptr, _ptr, _i64, _f32, _i64, _ptr, _i64]),
}


class NativeUnavailableError(RuntimeError):
    """``MGUP_DIST_NATIVE=1`` but the native kernels could not be built or loaded."""


def _normalised(raw: str) -> str:
    """The ``MGUP_DIST_NATIVE`` setting from its raw value; `ValueError` for anything but ``auto``, ``0`` or
    ``1``."""
    value = raw.strip().lower()
    if value not in MODES:
        raise ValueError(f"MGUP_DIST_NATIVE={value!r}: expected one of {', '.join(MODES)}")
    return value


def cache_dir() -> Path:
    """Where built libraries live (see the module docstring)."""
    root = os.environ.get("MGUP_DIST_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mgup_dist"


def isa_flags() -> tuple[str, ...]:
    """Instruction-set flags for this CPU: AVX2, FMA and POPCNT where torch uses AVX2, none elsewhere."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ("-mavx2", "-mfma", "-mpopcnt")
    return ()


def _compiler() -> str:
    compiler = os.environ.get("CC", "cc")
    found = shutil.which(compiler)
    if found is None:
        raise NativeUnavailableError(f"no C compiler: {compiler!r} is not on PATH (set CC to one)")
    return found


def build(target_dir: Path | None = None, source_dir: Path | None = None) -> Path:
    """Compile `SOURCES` (unless already built) and return the library's path. `NativeUnavailableError` when
    the compiler is missing or fails (its output is in the message). ``source_dir``: take the files of those names
    from there instead (another checkout's kernels, e.g. for `benchmarks.native_ab`)."""
    compiler = _compiler()
    flags = (*FLAGS, *isa_flags())
    sources = SOURCES if source_dir is None else tuple(Path(source_dir) / path.name for path in SOURCES)
    header = HEADER if source_dir is None else Path(source_dir) / HEADER.name
    texts = [path.read_bytes() for path in (*sources, header)]
    key = hashlib.sha256(b"\0".join([*texts, " ".join(flags).encode(), compiler.encode(), platform.machine().encode()]))
    directory = (target_dir or cache_dir()) / f"native-{key.hexdigest()[:16]}"
    library = directory / "libmgup_select.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", temporary, *map(str, sources), "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            names = ", ".join(path.name for path in sources)
            raise NativeUnavailableError(f"{compiler} failed to build {names}:\n{result.stderr.strip()}")
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return library


def load(path: Path) -> ctypes.CDLL:
    """Open the built library and declare its functions' C signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (result, arguments) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


@lru_cache(maxsize=None)
def _cached(raw: str) -> ctypes.CDLL | None:
    """The library for the raw ``MGUP_DIST_NATIVE`` value (remembered per value: `library` runs per kernel call)."""
    setting = _normalised(raw)
    if setting == "0":
        return None
    try:
        return load(build())
    except (NativeUnavailableError, OSError) as error:
        if setting == "1":
            raise NativeUnavailableError(f"MGUP_DIST_NATIVE=1 but the native kernels are unavailable: {error}") from error
        logger.warning("native MGUP selection kernels unavailable, using the numpy path (slower): %s", error)
        return None


_pins = threading.local()  # per thread: the libraries `pinned` blocks hold, innermost last


def library() -> ctypes.CDLL | None:
    """The native kernels, or None (see the module docstring); built and loaded once per process and setting.
    Inside a `pinned` block, what `library` returned on entering it (``MGUP_DIST_NATIVE`` is not read again)."""
    held = getattr(_pins, "stack", None)
    if held:
        return held[-1]
    return _cached(os.environ.get("MGUP_DIST_NATIVE", "auto"))


@contextlib.contextmanager
def using(lib: ctypes.CDLL | None) -> Iterator[None]:
    """Within the block, in this thread, `library` answers ``lib`` (None: the portable paths)."""
    if not hasattr(_pins, "stack"):
        _pins.stack = []
    _pins.stack.append(lib)
    try:
        yield
    finally:
        _pins.stack.pop()


def pinned() -> contextlib.AbstractContextManager[None]:
    """Within the block, in this thread, `library` answers without reading ``MGUP_DIST_NATIVE``: the kernels
    are looked up once for a whole optimizer step instead of once per kernel call."""
    return using(library())
