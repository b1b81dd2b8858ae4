"""Build script. The package metadata lives in pyproject.toml; this file adds the compiled
extension ``ditfast._C`` (sources in csrc/) and records what was built in ditfast/_build_info.py.

What gets built (decided at install time, printed as "ditfast setup: ..."):
  * torch with CUDA and nvcc found (CUDA_HOME)  -> ditfast._C with CPU and CUDA kernels
  * otherwise, a C++ compiler found             -> ditfast._C with the CPU kernels only
  * no torch at build time or no C++ compiler   -> no extension (pure-Python install)
``import ditfast`` works in every case; ditfast._ext reports what is missing and why.

Environment variables:
  DITFAST_SKIP_CUDA_BUILD=1       build ditfast._C without its CUDA kernels (CPU kernels only)
  DITFAST_SKIP_EXT_BUILD=1        build no extension at all
  DITFAST_CUDA_ARCHS="8.0;9.0"    compute capabilities to compile for (default "8.0;9.0"; entries
                                  like "8.6", "9.0a", "9.0+PTX"; separated by ';', ',' or spaces)
  MAX_JOBS=N                      parallel compile jobs (ninja); use it on small machines
  CUDA_HOME=/usr/local/cuda       the CUDA toolkit; nvcc is $CUDA_HOME/bin/nvcc
  CXX                             the C++ compiler (default c++)

torch must be importable while building: install with ``pip install --no-build-isolation .``
(an isolated build environment has no torch, and then no extension is built).
"""
import datetime
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "ditfast", "_build_info.py")
DEFAULT_CUDA_ARCHS = "8.0;9.0"

CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/ops.cpp",
    "csrc/module.cpp",
    "csrc/cpu/modulate_cpu.cpp",
    "csrc/cpu/rope_cpu.cpp",
]
CUDA_SOURCES = ["csrc/cuda/modulate.cu", "csrc/cuda/rope.cu"]


def _log(msg: str) -> None:
    print(f"ditfast setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_cuda_archs(spec: str) -> list:
    """"8.0;9.0+PTX" -> ["8.0", "9.0+PTX"]; raises ValueError on malformed entries."""
    archs = [a for a in re.split(r"[;,\s]+", spec.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a):
            raise ValueError(f"DITFAST_CUDA_ARCHS: bad entry {a!r}; expected e.g. '8.0', '9.0a' or '9.0+PTX'")
    if not archs:
        raise ValueError("DITFAST_CUDA_ARCHS is empty")
    return archs


def gencode_flags(archs: list) -> list:
    """nvcc -gencode flags: SASS for each arch, plus PTX for entries ending in +PTX."""
    flags = []
    for a in archs:
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if a.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _nvcc_release(nvcc: str):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _ensure_ninja_on_path() -> None:
    """torch's BuildExtension runs `ninja`; a venv's ninja is not on PATH when pip is run by path."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in candidates:
        if os.path.exists(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def plan():
    """Decide what to build. Returns (ext_modules, cmdclass, info) where info is the build record."""
    info = {
        "EXT_BUILT": False,
        "WITH_CUDA": False,
        "CUDA_ARCHS": (),
        "CUDA_VERSION": None,
        "TORCH_VERSION": None,
        "TORCH_CUDA_VERSION": None,
        "REASON": "",
        "BUILT_AT": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if _flag("DITFAST_SKIP_EXT_BUILD"):
        info["REASON"] = "DITFAST_SKIP_EXT_BUILD=1 was set"
        return [], {}, info
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # e.g. pip's isolated build environment
        info["REASON"] = f"torch was not importable at build time ({exc}); install with --no-build-isolation"
        return [], {}, info
    info["TORCH_VERSION"] = torch.__version__
    info["TORCH_CUDA_VERSION"] = torch.version.cuda
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        info["REASON"] = f"no C++ compiler ({cxx!r} not found; set CXX)"
        return [], {}, info
    _ensure_ninja_on_path()

    nvcc = None
    if _flag("DITFAST_SKIP_CUDA_BUILD"):
        cuda_reason = "DITFAST_SKIP_CUDA_BUILD=1 was set"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} was built without CUDA"
    elif cpp_extension.CUDA_HOME is None:
        cuda_reason = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
    else:
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        cuda_reason = "" if os.path.exists(nvcc) else f"nvcc not found at {nvcc} (set CUDA_HOME)"
        if cuda_reason:
            nvcc = None

    cxx_flags = ["-O3"]
    if nvcc is None:
        info["REASON"] = f"CUDA kernels not built: {cuda_reason}"
        ext = cpp_extension.CppExtension(
            "ditfast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}
        )
    else:
        archs = parse_cuda_archs(os.environ.get("DITFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        info["WITH_CUDA"] = True
        info["CUDA_ARCHS"] = tuple(archs)
        info["CUDA_VERSION"] = _nvcc_release(nvcc)
        # No --use_fast_math: the kernels are memory-bound, and it would flush fp32 denormals and
        # approximate divisions for no measurable gain.
        nvcc_flags = ["-O3", "-lineinfo", "-DDITFAST_WITH_CUDA"] + gencode_flags(archs)
        ext = cpp_extension.CUDAExtension(
            "ditfast._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags + ["-DDITFAST_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    info["EXT_BUILT"] = True
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithRecord(base):
        """After a successful build, write the record next to the built ditfast._C (the source tree
        for in-place/editable builds, build/lib for wheels), so it always describes that binary."""

        def run(self):
            super().run()
            write_build_info(info, os.path.join(os.path.dirname(self.get_ext_fullpath("ditfast._C")), "_build_info.py"))

    return [ext], {"build_ext": BuildExtWithRecord}, info


def write_build_info(info: dict, path: str = BUILD_INFO) -> None:
    lines = [
        '"""What setup.py built (generated at install time; git-ignored; read by ditfast._ext)."""',
        "",
    ]
    lines += [f"{k} = {v!r}" for k, v in info.items()]
    text = "\n".join(lines) + "\n"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:  # read-only source tree: the record is informational only
        _log(f"could not write {path}: {exc}")


def record_with_build_py(info: dict):
    """Without an extension there is no build_ext run: build_py writes the record (why nothing was
    built) into the wheel, or into the source tree for editable installs."""
    from setuptools.command.build_py import build_py

    class BuildPyWithRecord(build_py):
        def run(self):
            super().run()
            editable = getattr(self, "editable_mode", False) or not self.build_lib
            write_build_info(info, BUILD_INFO if editable else os.path.join(self.build_lib, "ditfast", "_build_info.py"))

    return BuildPyWithRecord


ext_modules, cmdclass, build_info = plan()
if build_info["EXT_BUILT"]:
    what = "CPU + CUDA kernels for " + ";".join(build_info["CUDA_ARCHS"]) if build_info["WITH_CUDA"] else "CPU kernels"
    _log(f"building ditfast._C ({what}); MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
if build_info["REASON"]:
    _log(build_info["REASON"])
if not build_info["EXT_BUILT"]:
    cmdclass = {"build_py": record_with_build_py(build_info)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
