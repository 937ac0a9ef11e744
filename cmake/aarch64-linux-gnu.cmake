# Cross-compiling the module for aarch64 Linux on an x86-64 Debian machine
# (g++-aarch64-linux-gnu): the build the README's "aarch64 under emulation"
# note describes. Python's aarch64 headers come from a sysroot given as
# BITDLM_AARCH64_PYROOT (Debian bookworm's libpython3.11-dev:arm64 unpacked
# there; the build interpreter must be a Python 3.11 too):
#   cmake -S . -B build-a64 -G Ninja -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     -DBITDLM_AARCH64_PYROOT=/path/to/root -Dpybind11_DIR=... -DPython_EXECUTABLE=python3
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
if(BITDLM_AARCH64_PYROOT)
  set(Python_INCLUDE_DIR ${BITDLM_AARCH64_PYROOT}/usr/include/python3.11 CACHE PATH "")
  # pybind11 would ask the (x86-64) build interpreter for the module suffix
  set(PYTHON_MODULE_EXTENSION .cpython-311-aarch64-linux-gnu.so CACHE STRING "")
  # Debian's pyconfig.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>;
  # -idirafter: the cross toolchain's own headers still come first
  add_compile_options(-idirafter ${BITDLM_AARCH64_PYROOT}/usr/include)
endif()
