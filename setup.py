"""Build dive._C (C++17 + OpenMP, always) and dive._C_cuda (nvcc, when found).

Environment:
  DIVE_CUDA=auto|0|1      build the CUDA module when nvcc is found (auto), never, or always (error
                          without nvcc). Default auto.
  DIVE_CUDA_ARCHS         compute capabilities, e.g. "8.6" or "8.0;8.6;8.9;9.0+PTX" (the default).
  CUDA_HOME / CUDA_PATH   where to look for bin/nvcc before PATH.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# -fno-trapping-math lets the selects in the epilogue loops vectorise (no FP traps are used).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def find_cuda_home():
    """The CUDA toolkit root (bin/nvcc and the static runtime), or None.

    An explicit CUDA_HOME / CUDA_PATH is the only place looked at; else nvcc on PATH (which may be
    a wrapper script: its dry run names the real toolkit), else /usr/local/cuda.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit]
    nvcc = shutil.which("nvcc")
    if not explicit and nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                                 capture_output=True, text=True)
            top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            candidates.append(top and str(Path(top.group(1)).resolve()))
        except OSError:
            pass
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    if not explicit:
        candidates.append("/usr/local/cuda")
    for cand in filter(None, candidates):
        if (Path(cand) / "bin" / "nvcc").exists() and cuda_lib_dir(Path(cand)):
            return Path(cand)
    return None


def cuda_lib_dir(home):
    for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def cuda_wanted():
    mode = os.environ.get("DIVE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"DIVE_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    home = find_cuda_home()
    if home is None and mode == "1":
        sys.exit("DIVE_CUDA=1 but no CUDA toolkit (bin/nvcc and libcudart_static.a) was found: "
                 "set CUDA_HOME or put nvcc on PATH")
    return home


def gencode_flags(archs):
    """'8.0;8.6;9.0+PTX' -> nvcc -gencode flags (SASS for each, PTX for those marked +PTX)."""
    flags, names = [], []
    for item in archs.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        num = item[:-4] if ptx else item
        try:
            major, minor = num.split(".")
            cc = f"{int(major)}{int(minor)}"
        except ValueError:
            sys.exit(f"DIVE_CUDA_ARCHS: cannot read {item!r}; expected e.g. 8.6 or 9.0+PTX")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
        names.append(item)
    if not flags:
        sys.exit("DIVE_CUDA_ARCHS is empty")
    return flags, names


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc into objects linked next to the C++ bindings."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + self.compile_cuda(ext, cu_sources)
        super().build_extension(ext)

    def compile_cuda(self, ext, sources):
        nvcc = ext.nvcc
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [str(nvcc), "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-lineinfo",
                   "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-Werror", "all-warnings",
                   f"-I{CSRC}", *ext.gencode]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


def extensions():
    exts = [
        Extension(
            "dive._C",
            sources=["csrc/bindings_cpu.cpp", "csrc/smooth_chamfer_cpu.cpp",
                     "csrc/slot_attention_cpu.cpp", "csrc/top_lines_cpu.cpp"],
            include_dirs=[pybind11.get_include(), str(CSRC)],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
    home = cuda_wanted()
    if home is not None:
        archs = os.environ.get("DIVE_CUDA_ARCHS", DEFAULT_ARCHS)
        gencode, names = gencode_flags(archs)
        cuda_lib = cuda_lib_dir(home)
        cuda = Extension(
            "dive._C_cuda",
            sources=["csrc/bindings_cuda.cpp", "csrc/smooth_chamfer_cuda.cu",
                     "csrc/slot_attention_cuda.cu"],
            include_dirs=[pybind11.get_include(), str(CSRC), str(home / "include")],
            define_macros=[("DIVE_CUDA_ARCHS", '"' + ";".join(names) + '"')],
            extra_compile_args=["-O3", "-std=c++17", "-Wall"],
            # Static runtime: the module imports (and reports 0 devices) where no driver exists.
            extra_link_args=[f"-L{cuda_lib}", "-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread"],
            language="c++",
        )
        cuda.nvcc, cuda.gencode = home / "bin" / "nvcc", gencode
        exts.append(cuda)
    return exts


setup(
    packages=["dive", "dive.ops", "dive.eval", "dive.retrieval", "dive.data", "dive.models",
              "dive.kernels"],
    package_dir={"dive": "dive", "dive.kernels": "kernels"},
    package_data={"dive.ops": ["dispatch.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
