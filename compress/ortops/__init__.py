"""Our onnxruntime custom-operator library (``ops.c``): ``compress::LutMatMul``, the matmul of weights stored as
look-up codes (palettes with float16 or int8 tables, vector code books), ``compress::HalfMatMul``, the matmul of a
float16 / bfloat16 weight (a dense layer, the tied output head), ``compress::GridMatMul``, the matmul of codes on a
grid with per-group scales, offsets or a code book (llama.cpp's k-quants, NormalFloat), and ``compress::SparseMatMul``,
the matmul of a pruned weight (a bitmap and its kept values: 16-bit floats or an integer grid), all run from their
stored bytes so a session never holds them as float32. Each decodes a row while it multiplies (``decode.c``, AVX2,
AVX-512 where the CPU has it) inside a shared row-by-row / tiled matmul (``rows.c``). ``compress::SiluGate``
(``gate.c``) is a SiLU MLP's gating on its packed gate/up product in one kernel; ``compress::OutlierAdd``
(``outliers.c``) adds a dense-and-sparse weight's outliers, from their stored rows, to its dense part's product.

``python -m compress.ortops`` builds it (``make setup`` does): onnxruntime's C API header comes from Debian's
``libonnxruntime-dev`` package (the PyPI wheels ship the library without headers; the C API is stable, so a
library built against these headers loads in every later onnxruntime), checked against its SHA-256, and the C
compiler of the machine (``$CC``, else ``cc``) builds ``libcompress_ortops.so`` beside this file: the kernels twice, for
AVX2 and for AVX-512 (``VARIANTS``), so the library (copied into export folders) runs on any AVX2 CPU and picks the
AVX-512 kernels where the CPU has them (``COMPRESS_ORTOPS_ARCH=avx2`` in the environment of a session asks for the
AVX2 ones: tests and benches compare both).
Without it the exporter decodes those weights in the graph (onnxruntime then folds them to float32) and says so;
a library older than its sources is built again first (``current``).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libcompress_ortops.so"
LIBRARY = HERE / LIBRARY_NAME
SOURCES = [HERE / name for name in ("ops.c", "rows.c", "decode.c", "int8.c", "gate.c", "outliers.c", "variant.c",
                                    "ops.h")]
DOMAIN = "compress"

HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADER = "onnxruntime_c_api.h"


class BuildError(RuntimeError):
    """The library could not be built (no network for the header, no compiler, a compile error)."""


def library() -> Path | None:
    """The built library, or None (``python -m compress.ortops`` builds it). Stale when older than its sources."""
    if not LIBRARY.is_file():
        return None
    built = LIBRARY.stat().st_mtime
    return LIBRARY if all(src.stat().st_mtime <= built for src in SOURCES) else None


def current() -> Path | None:
    """The library at its sources' state for an export: built again where it is older than them (a checkout that
    changed a kernel; the header cached by the first build), None where it was never built or cannot be rebuilt."""
    if not LIBRARY.is_file():
        return None
    try:
        return build()
    except BuildError:
        return None


def _cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "compress" / "onnxruntime-headers-1.21.0"


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a ``.deb`` (an ``ar`` archive)."""
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("the downloaded header package is not a Debian archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def headers() -> Path:
    """The folder holding ``onnxruntime_c_api.h``: downloaded once into the user's cache."""
    folder = _cache()
    if (folder / HEADER).is_file():
        return folder
    url, sha256 = HEADERS_DEB
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise BuildError(f"cannot download onnxruntime's C API header from {url} ({e})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BuildError(f"{url} does not have the expected SHA-256")
    payload = _ar_members(data).get("data.tar.xz")
    if payload is None:
        raise BuildError("the header package holds no data.tar.xz")
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(payload))) as tar:
        wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("./usr/include/onnxruntime/")
                  and "/" not in m.name.removeprefix("./usr/include/onnxruntime/")]
        staging = Path(tempfile.mkdtemp(prefix="ort-headers-"))
        for member in wanted:
            source = tar.extractfile(member)
            assert source is not None
            (staging / Path(member.name).name).write_bytes(source.read())
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi"]
VARIANTS = {"avx2": AVX2, "avx512": AVX2 + AVX512}  # the builds of the kernels; ops.c picks one per CPU


def _compile(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:1] + cmd[-3:])} failed:\n{done.stderr.strip()}")


def build(force: bool = False) -> Path:
    """Build the library (when missing or older than its sources); its path."""
    if not force and library() is not None:
        return LIBRARY
    include = headers()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler (set CC, or install gcc)")
    partial = LIBRARY.with_suffix(".so.partial")
    with tempfile.TemporaryDirectory(prefix="ortops-") as tmp:
        objects = []

        def compile_one(source: Path, flags: list[str], stem: str) -> None:
            obj = Path(tmp) / f"{stem}.o"
            _compile([compiler, "-O3", "-fPIC", "-fvisibility=hidden", "-std=c11", "-Wall", *flags, "-I", str(include),
                      "-c", str(source), "-o", str(obj)])
            objects.append(str(obj))

        compile_one(HERE / "ops.c", [], "ops")  # the glue, built for the baseline CPU: it checks the CPU first
        for variant, flags in VARIANTS.items():  # the kernels, once per vector extension
            for source in (s for s in SOURCES if s.suffix == ".c" and s.name != "ops.c"):
                compile_one(source, [*flags, f"-DKERNEL_VARIANT={variant}"], f"{source.stem}_{variant}")
        try:
            _compile([compiler, "-shared", *objects, "-o", str(partial)])
        except BuildError:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(LIBRARY)
    return LIBRARY
