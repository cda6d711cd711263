# canopy's libraries: one static library per module, exported as canopy::<module>.
#   canopy_add_module(NAME SOURCES ... DEPS <public> ... PRIVATE_DEPS <private> ...)
# Public headers live in <module>/include/canopy/<module>/ and are installed to
# include/canopy/<module>/. canopy_options (warnings, sanitizers) applies to canopy's own
# code only and never reaches a consumer.
function(canopy_add_module name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(canopy_${name} ${ARG_SOURCES})
  add_library(canopy::${name} ALIAS canopy_${name})
  set_target_properties(canopy_${name} PROPERTIES EXPORT_NAME ${name} OUTPUT_NAME canopy_${name})
  target_include_directories(canopy_${name} PUBLIC
    $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  target_link_libraries(canopy_${name} PUBLIC ${ARG_DEPS}
                        PRIVATE $<BUILD_INTERFACE:canopy_options> ${ARG_PRIVATE_DEPS})
  install(TARGETS canopy_${name} EXPORT canopyTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
endfunction()
