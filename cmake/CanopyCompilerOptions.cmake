# Warnings and sanitizers for canopy's own targets (never for third-party code).
add_library(canopy_options INTERFACE)
target_compile_options(canopy_options INTERFACE -Wall -Wextra -Wpedantic -Wshadow=local
  -Wnon-virtual-dtor -Wno-unused-parameter)
if(CANOPY_WARNINGS_AS_ERRORS)
  target_compile_options(canopy_options INTERFACE -Werror)
endif()
if(CANOPY_SANITIZE_ADDRESS)
  # GCC 12 reports <regex>'s std::function members as maybe-uninitialized under the
  # sanitizers' instrumentation (a false positive of the optimiser, not of canopy's code).
  # No vptr check: it needs the typeinfo of LibTorch's classes (c10::DynamicType), which the
  # wheel's libraries do not export.
  target_compile_options(canopy_options INTERFACE -fsanitize=address,undefined -fno-sanitize=vptr
    -fno-omit-frame-pointer $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>)
  target_link_options(canopy_options INTERFACE -fsanitize=address,undefined -fno-sanitize=vptr)
endif()
if(CANOPY_SANITIZE_THREAD)
  target_compile_options(canopy_options INTERFACE -fsanitize=thread)
  target_link_options(canopy_options INTERFACE -fsanitize=thread)
endif()
