"""Compile the fused CPU kernels against the installed TensorFlow, once, cached.

The shared library is built with the machine's C++ compiler (`CXX`, default
g++) and TensorFlow's own flags (`tf.sysconfig`), and cached under
`$LARQ_PROX_KERNELS_CACHE` (default `~/.cache/larq_prox/kernels`) in a file
named by the TensorFlow version and a hash of the sources, flags and
compiler: a new TensorFlow or an edited source builds anew, anything else
reuses the file. The code is compiled for this machine's instruction set
(`-march=native`: AVX2 / AVX-512 on x86-64, the CPU's extensions on aarch64;
the 16-bit update runs ~2.5x faster than with x86-64's baseline SSE2), and
the cache key holds the target options the compiler resolved, so that a
cache shared by different machines gives each its own build.
`LARQ_PROX_KERNELS_ARCH` sets another `-march` value (`x86-64-v2`,
`armv8-a`, ...), or `portable` for the compiler's baseline. A file lock lets
parallel processes (pytest workers) wait for one build instead of racing. `make install` runs it; otherwise the first use
of a kernel does (about 30-60 s on 2 cores).

    python -m larq_prox.kernels.build          # prints the library's path and the build time
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["ARCH_ENV", "HEADERS", "SOURCES", "BuildError", "arch_flags", "build", "cache_dir",
           "library_path"]

_SRC = pathlib.Path(__file__).resolve().parent / "src"
SOURCES = (_SRC / "lqp_kernels.cc", _SRC / "lqp_update.cc")
"""The C++ sources of the library: the low-memory ops and the fused 16-bit optimizer updates."""
HEADERS = (_SRC / "lqp_numeric.h",)
"""Headers the sources include (part of the cache key)."""
ARCH_ENV = "LARQ_PROX_KERNELS_ARCH"
"""The `-march` value to compile for (default `native`; `portable`: no -march flag)."""

# -fno-math-errno lets sqrt vectorize; -ffp-contract=off keeps a*b+c two
# roundings on every target (aarch64 would fuse them), as TF's float32 ops.
_FLAGS = ("-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared",
          "-Wno-deprecated-declarations")


class BuildError(RuntimeError):
    """The library could not be built (no compiler, compile error); the message says why."""


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept (`$LARQ_PROX_KERNELS_CACHE` or ~/.cache/larq_prox/kernels)."""
    if os.environ.get("LARQ_PROX_KERNELS_CACHE"):
        return pathlib.Path(os.environ["LARQ_PROX_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "larq_prox" / "kernels"


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    path = shutil.which(compiler)
    if path is None:
        raise BuildError(
            f"no C++ compiler: `{compiler}` is not on PATH (install g++, e.g. "
            "`apt-get install g++`, or set CXX)"
        )
    return path


def arch_flags() -> list[str]:
    """The instruction-set flag: `-march=native` unless `LARQ_PROX_KERNELS_ARCH` says otherwise."""
    arch = os.environ.get(ARCH_ENV, "native").strip() or "native"
    return [] if arch == "portable" else [f"-march={arch}"]


def _resolved_target(compiler: str, flags: list[str]) -> str:
    """The target options the compiler enables for `flags` (what -march=native means here)."""
    if not flags:
        return ""
    done = subprocess.run([compiler, *flags, "-Q", "--help=target"], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"`{compiler} {' '.join(flags)}` is refused: {done.stderr.strip()[:300]} "
                         f"(set {ARCH_ENV}=portable, or a -march value the compiler knows)")
    return done.stdout


def _command(output: pathlib.Path) -> list[str]:
    import tensorflow as tf

    return [_compiler(), *_FLAGS, *arch_flags(), *map(str, SOURCES), "-o", str(output),
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def library_path() -> pathlib.Path:
    """The cached library's path for this TensorFlow, these sources and this compiler."""
    import tensorflow as tf

    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(_resolved_target(compiler, arch_flags()).encode())
    # The sources by name, not path: clones and worktrees of one checkout share a build.
    names = {str(source): source.name for source in SOURCES}
    digest.update(" ".join(names.get(a, a) for a in _command(pathlib.Path("out"))).encode())
    digest.update(version.encode())
    return cache_dir() / f"lqp_kernels-tf{tf.__version__}-{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(force: bool = False) -> pathlib.Path:
    """Build the library if this TensorFlow/source/compiler has none cached; its path.

    Raises `BuildError` with the compiler's message when the build fails.

    ```python
    from larq_prox.kernels import build
    path = build.build()      # ~/.cache/larq_prox/kernels/lqp_kernels-tf2.19.1-....so
    ```
    """
    path = library_path()
    with _locked(path):
        if path.exists() and not force:
            return path
        # Built under a temporary name and renamed: a reader never sees half a file.
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            temporary = pathlib.Path(scratch) / path.name
            done = subprocess.run(_command(temporary), capture_output=True, text=True)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line]
                raise BuildError(
                    "compiling the kernels failed: " + ("; ".join(errors[:3]) or done.stderr[-500:])
                )
            os.replace(temporary, path)
    return path


def main() -> int:
    start = time.perf_counter()
    try:
        path = build()
    except BuildError as error:
        print(f"larq-prox kernels not built ({error}); the pure-TF ops will run.", file=sys.stderr)
        return 0  # the package works without them
    print(f"larq-prox kernels: {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
