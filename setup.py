"""Build script. The package metadata lives in pyproject.toml; this file adds the compiled
extension ``ditfast._C`` (sources in csrc/) and records what was built in ditfast/_build_info.py.

What gets built (decided at install time, printed as "ditfast setup: ..."):
  * torch with CUDA and a CUDA toolkit found    -> ditfast._C with CPU and CUDA kernels
  * otherwise, a C++ compiler found             -> ditfast._C with the CPU kernels only
  * no torch at build time or no C++ compiler   -> no extension (pure-Python install)
  * the CUDA kernels fail to compile            -> ditfast._C with the CPU kernels only, the reason recorded
``import ditfast`` works in every case; ditfast._ext reports what is missing and why.

The toolkit is $CUDA_HOME (or $CUDA_PATH) when set, else the first of the TOP= folder ``nvcc --dryrun`` reports for the
first nvcc on PATH (right also when that nvcc is a wrapper script or a symlink), and /usr/local/cuda
that has both bin/nvcc and include/cuda_runtime.h; the choice and every rejected candidate are logged.

An editable install (``pip install -e``) whose csrc/, setup.py, torch version and build switches are
unchanged since the last build (SOURCE_HASH in ditfast/_build_info.py; ``python setup.py --source-hash``) keeps
the ditfast._C already built in place instead of compiling it again; DITFAST_FORCE_BUILD=1 rebuilds.

Environment variables:
  DITFAST_SKIP_CUDA_BUILD=1       build ditfast._C without its CUDA kernels (CPU kernels only)
  DITFAST_SKIP_EXT_BUILD=1        build no extension at all
  DITFAST_CUDA_ARCHS="8.0;9.0"    compute capabilities to compile for (default "8.0;9.0"; entries
                                  like "8.6", "9.0a", "9.0+PTX"; separated by ';', ',' or spaces)
  MAX_JOBS=N                      parallel compile jobs (ninja); use it on small machines
  CUDA_HOME=/usr/local/cuda       the CUDA toolkit; nvcc is $CUDA_HOME/bin/nvcc (found without it too)
  DITFAST_FORCE_BUILD=1           compile ditfast._C even when nothing it is built from changed
  CXX                             the C++ compiler (default c++)

torch must be importable while building: install with ``pip install --no-build-isolation .``
(an isolated build environment has no torch, and then no extension is built).
"""
import datetime
import glob
import importlib.util
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


SWITCHES = ("DITFAST_SKIP_CUDA_BUILD", "DITFAST_SKIP_EXT_BUILD", "DITFAST_CUDA_ARCHS", "CXX")


def source_hash(torch_version: str) -> str:
    """The fingerprint of what ditfast._C is built from: every file under csrc/, this file, the torch
    version, the Python version and the build switches (``python setup.py --source-hash`` prints it)."""
    import hashlib

    h = hashlib.sha256()
    files = [os.path.join(ROOT, "setup.py")]
    for d, _, names in sorted(os.walk(os.path.join(ROOT, "csrc"))):
        files += [os.path.join(d, n) for n in sorted(names)]
    for f in files:
        h.update(os.path.relpath(f, ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    for k in SWITCHES:
        h.update(f"{k}={os.environ.get(k, '')}\0".encode())
    h.update(f"torch={torch_version}\0python={sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def _is_toolkit(home: str) -> str:
    """"" when ``home`` is a CUDA toolkit (bin/nvcc and include/cuda_runtime.h), else what is missing."""
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime.h") if not os.path.exists(os.path.join(home, p))]
    return "" if not missing else "no " + " and no ".join(missing)


def _nvcc_top(nvcc: str):
    """The toolkit folder nvcc itself reports (``#$ TOP=...`` of a dry run), wrappers and symlinks resolved."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def resolve_cuda_home():
    """(toolkit folder or None, how it was found, [rejected candidates with the reason]). A $CUDA_HOME or
    $CUDA_PATH that is set is the only candidate: an explicit choice is never replaced by a guess."""
    for v in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(v)
        if home:
            why = _is_toolkit(home)
            return (None, None, [f"${v} = {home}: {why}"]) if why else (home, f"${v}", [])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((_nvcc_top(nvcc), f"TOP= of `{nvcc} --dryrun`"))
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"the folder of {os.path.realpath(nvcc)}"))
    candidates.append(("/usr/local/cuda", "/usr/local/cuda"))
    rejected = []
    for home, how in candidates:
        if not home:
            continue
        why = _is_toolkit(home)
        if not why:
            return home, how, rejected
        rejected.append(f"{how} = {home}: {why}")
    return None, None, rejected


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
    cuda_home, how, rejected = (None, None, []) if _flag("DITFAST_SKIP_CUDA_BUILD") else resolve_cuda_home()
    for r in rejected:
        _log(f"not a CUDA toolkit: {r}")
    if cuda_home:
        _log(f"CUDA toolkit: {cuda_home} (from {how})")
        os.environ["CUDA_HOME"] = cuda_home  # torch's cpp_extension reads it when imported
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # e.g. pip's isolated build environment
        info["REASON"] = f"torch was not importable at build time ({exc}); install with --no-build-isolation"
        return [], {}, info
    info["TORCH_VERSION"] = torch.__version__
    info["TORCH_CUDA_VERSION"] = torch.version.cuda
    info["SOURCE_HASH"] = source_hash(torch.__version__)
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # also when cpp_extension was imported before this
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
    elif cuda_home is None:
        cuda_reason = ("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc and "
                       "include/cuda_runtime.h)" + (f"; rejected: {'; '.join(rejected)}" if rejected else ""))
    else:
        nvcc, cuda_reason = os.path.join(cuda_home, "bin", "nvcc"), ""

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
    if _up_to_date(info):
        return [], {}, info
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithRecord(base):
        """After a successful build, write the record next to the built ditfast._C (the source tree
        for in-place/editable builds, build/lib for wheels), so it always describes that binary. When
        the CUDA kernels fail to compile, the CPU kernels are built alone and the reason recorded."""

        def run(self):
            inplace = self.inplace  # setuptools clears it while it builds, and restores it only on success
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - a broken toolkit must not cost the CPU kernels
                if not info["WITH_CUDA"]:
                    raise
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
                _log(f"the CUDA build failed ({why}); building the CPU kernels alone")
                info.update(WITH_CUDA=False, CUDA_ARCHS=(), REASON=f"CUDA kernels not built: their compile failed ({why})")
                cpu = cpp_extension.CppExtension("ditfast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags})
                for e in self.extensions:  # in place: setuptools already attached its bookkeeping to these objects
                    for k in ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args",
                              "extra_link_args", "define_macros", "runtime_library_dirs", "language"):
                        setattr(e, k, getattr(cpu, k, None))
                self.compiler = None  # build_ext.run() makes a fresh compiler from a name, not the used object
                self.inplace = inplace
                super().run()
            write_build_info(info, os.path.join(os.path.dirname(self.get_ext_fullpath("ditfast._C")), "_build_info.py"))

    return [ext], {"build_ext": BuildExtWithRecord}, info


def _editable() -> bool:
    return any(a in ("editable_wheel", "develop") for a in sys.argv[1:]) or (
        "build_ext" in sys.argv[1:] and any(a in ("--inplace", "-i") for a in sys.argv[1:]))


def _up_to_date(info: dict) -> bool:
    """An editable install keeps the in-place ditfast._C when its recorded SOURCE_HASH is the current one."""
    if _flag("DITFAST_FORCE_BUILD") or not _editable() or not glob.glob(os.path.join(ROOT, "ditfast", "_C.*.so")):
        return False
    try:
        spec = importlib.util.spec_from_file_location("_ditfast_old_build_info", BUILD_INFO)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    except Exception:  # noqa: BLE001 - no or unreadable record: build
        return False
    if getattr(old, "SOURCE_HASH", None) != info["SOURCE_HASH"] or not getattr(old, "EXT_BUILT", False):
        return False
    _log(f"ditfast._C is up to date (SOURCE_HASH {info['SOURCE_HASH']}: csrc/, setup.py, torch {info['TORCH_VERSION']} "
         "and the build switches unchanged): not compiled again; DITFAST_FORCE_BUILD=1 rebuilds")
    info["UP_TO_DATE"] = True
    return True


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


if __name__ == "__main__" and sys.argv[1:] == ["--source-hash"]:  # scripts/setup_env.sh: skip an unchanged install
    import torch

    print(source_hash(torch.__version__))
    sys.exit(0)

ext_modules, cmdclass, build_info = plan()
if build_info.get("UP_TO_DATE"):
    cmdclass = {}
elif build_info["EXT_BUILT"]:
    what = "CPU + CUDA kernels for " + ";".join(build_info["CUDA_ARCHS"]) if build_info["WITH_CUDA"] else "CPU kernels"
    _log(f"building ditfast._C ({what}); MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
if build_info["REASON"] and not build_info.get("UP_TO_DATE"):
    _log(build_info["REASON"])
if not build_info["EXT_BUILT"]:
    cmdclass = {"build_py": record_with_build_py(build_info)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
