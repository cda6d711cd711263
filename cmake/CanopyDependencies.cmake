# Third-party dependencies. LibTorch comes from the pinned torch wheel in the venv made by
# scripts/setup: pass -DCMAKE_PREFIX_PATH=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)').
# Nothing is downloaded at configure time.

# The wheel is CUDA-enabled; its CMake config looks for the CUDA toolkit (installed here).
find_package(Torch 2.0 REQUIRED CONFIG)
# Torch's flags include -D_GLIBCXX_USE_CXX11_ABI; keep them for every consumer.
# Exported with canopy (canopy::torch): consumers get the same flags and libraries.
# LibTorch's CPU half only: canopy loads the CUDA half (libtorch_cuda.so) at run time when
# the machine has an NVIDIA driver (core/device.cpp), which saves every start ~0.25 s of
# loading CUDA libraries on machines without a GPU.
add_library(canopy_torch INTERFACE)
set_target_properties(canopy_torch PROPERTIES EXPORT_NAME torch)
target_link_libraries(canopy_torch INTERFACE torch_cpu_library c10 ${CMAKE_DL_LIBS})
target_compile_options(canopy_torch INTERFACE ${TORCH_CXX_FLAGS})
# Torch headers are third-party: include them as system headers so our warnings stay ours.
get_target_property(_torch_inc torch INTERFACE_INCLUDE_DIRECTORIES)
if(_torch_inc)
  target_include_directories(canopy_torch SYSTEM INTERFACE ${_torch_inc})
endif()

# HDF5 is private to canopy::datasets (its RAII layer is not installed); HDF5::HDF5 is the
# imported target of CMake's FindHDF5 (its headers are system headers, warnings stay ours).
find_package(HDF5 REQUIRED COMPONENTS C)
find_package(TBB REQUIRED)
find_package(Boost 1.71 REQUIRED COMPONENTS program_options)
find_package(ZLIB REQUIRED)
find_package(PNG REQUIRED)   # libpng-dev: image inputs
find_package(JPEG REQUIRED)  # libjpeg-dev (libjpeg-turbo): image inputs
find_package(WebP REQUIRED)  # libwebp-dev: image inputs (cmake/FindWebP.cmake)
find_package(TIFF REQUIRED)  # libtiff-dev: image inputs
find_package(GIF REQUIRED)   # libgif-dev (giflib): image inputs
find_package(Threads REQUIRED)
find_package(OpenSSL 3.0 REQUIRED COMPONENTS Crypto)  # libssl-dev: SHA-256
# Open MPI (libopenmpi-dev): `mpirun -np K canopy ...` spreads the cache pass and training over
# K ranks. A process started without mpirun never calls it.
option(CANOPY_WITH_MPI "Build with MPI (scale-out over mpirun ranks)" ON)
if(CANOPY_WITH_MPI)
  find_package(MPI REQUIRED COMPONENTS C)
endif()

if(CANOPY_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
