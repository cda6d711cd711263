# libwebp's decoder (Debian: libwebp-dev), which ships no CMake package; found as CMake finds
# libpng and libjpeg, by header and library, so that a prefix of unpacked packages
# (CMAKE_PREFIX_PATH) will do. Defines WebP::webp, and WebP::webpdemux (an animation's frames).
find_path(WebP_INCLUDE_DIR NAMES webp/decode.h webp/demux.h)
find_library(WebP_LIBRARY NAMES webp)
find_library(WebP_DEMUX_LIBRARY NAMES webpdemux)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(WebP REQUIRED_VARS WebP_LIBRARY WebP_DEMUX_LIBRARY WebP_INCLUDE_DIR)
mark_as_advanced(WebP_INCLUDE_DIR WebP_LIBRARY WebP_DEMUX_LIBRARY)
if(WebP_FOUND AND NOT TARGET WebP::webp)
  add_library(WebP::webp UNKNOWN IMPORTED)
  set_target_properties(WebP::webp PROPERTIES IMPORTED_LOCATION "${WebP_LIBRARY}"
                                              INTERFACE_INCLUDE_DIRECTORIES "${WebP_INCLUDE_DIR}")
endif()
if(WebP_FOUND AND NOT TARGET WebP::webpdemux)
  add_library(WebP::webpdemux UNKNOWN IMPORTED)
  set_target_properties(WebP::webpdemux PROPERTIES IMPORTED_LOCATION "${WebP_DEMUX_LIBRARY}"
                                                   INTERFACE_INCLUDE_DIRECTORIES "${WebP_INCLUDE_DIR}"
                                                   INTERFACE_LINK_LIBRARIES WebP::webp)
endif()
