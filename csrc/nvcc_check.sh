#!/usr/bin/env bash
# CI check of the CUDA kernels: compile the extension's CUDA sources with nvcc for sm_80 and sm_90
# (the sources and nvcc flags of the real build, from fastdrn/extension.py), print each kernel's
# registers, stack frame and spills as ptxas reports them (-Xptxas -v), and fail on any compile
# error or register spill. Needs nvcc and an importable torch (a CPU wheel will do: only its
# headers are used); no GPU. Usage: csrc/nvcc_check.sh   (CUDA_HOME picks the toolkit, PYTHON the
# interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"

# Everything the compile needs, from the same code that configures the real build.
config="$(FASTDRN_CUDA_ARCH_LIST="8.0;9.0" "$python" - <<'EOF'
import importlib.util
import os
import shlex

from torch.utils import cpp_extension

spec = importlib.util.spec_from_file_location("_fastdrn_extension_config", "fastdrn/extension.py")
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
sources, nvcc_flags = ext.build_config(cuda=True)
cuda_sources = [s for s in sources if s.endswith(".cu")]
includes = ["csrc", *cpp_extension.include_paths()]  # device_type "cpu": torch's headers, no CUDA_HOME needed
flags = ["-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS, *nvcc_flags, "-Xptxas", "-v"]
# CPU wheels of torch leave out the configured c10/cuda header (it only sets a DLL-export macro,
# irrelevant on Linux); c10 has this switch for builds without it.
if not os.path.isfile(os.path.join(includes[1], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print(f"toolkit={shlex.quote(ext.find_cuda_toolkit() or '')}")
print(f"sources=({' '.join(map(shlex.quote, cuda_sources))})")
print(f"flags=({' '.join(map(shlex.quote, flags + [f'-I{d}' for d in includes]))})")
EOF
)"
eval "$config"
nvcc="${toolkit:+$toolkit/bin/}nvcc"
command -v "$nvcc" >/dev/null || { echo "nvcc_check: no nvcc found (set CUDA_HOME)" >&2; exit 1; }
echo "nvcc_check: $("$nvcc" --version | tail -n 2 | head -n 1)"

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
for source in "${sources[@]}"; do
  echo "nvcc_check: compiling $source for sm_80 and sm_90"
  if ! "$nvcc" "${flags[@]}" -c "$source" -o "$workdir/out.o" >"$workdir/log" 2>&1; then
    cat "$workdir/log"
    echo "nvcc_check: FAILED to compile $source" >&2
    exit 1
  fi
  "$python" - "$workdir/log" <<'EOF'
import re
import shutil
import subprocess
import sys

# ptxas -v reports, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
rows, current = [], None
for line in open(sys.argv[1]):
    if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
        current = {"kernel": m.group(1), "arch": m.group(2)}
        rows.append(current)
    elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
        current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
    elif current and (m := re.search(r"Used (\d+) registers", line)):
        current["regs"] = int(m.group(1))
if not rows:
    sys.exit("nvcc_check: ptxas reported no kernels")
names = [r["kernel"] for r in rows]
if shutil.which("c++filt"):
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
spilled = False
print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
for row, name in zip(rows, names):
    name = re.sub(r"\(anonymous namespace\)::|fastdrn::|void |\(.*", "", name)  # the template arguments tell them apart
    spills = row.get("spill_st", 0) + row.get("spill_ld", 0)
    spilled |= spills > 0
    print(f"{row['arch']:6} {row.get('regs', '?'):>4} {row.get('stack', 0):>5} "
          f"{row.get('spill_st', 0):>5}/{row.get('spill_ld', 0):<5}  {name}{'   <-- SPILLS' if spills else ''}")
if spilled:
    sys.exit("nvcc_check: FAILED: register spills")
EOF
done
echo "nvcc_check: OK (no errors, no spills)"
