# What aiorch links with, each as a global imported target: included by the
# build (CMakeLists.txt) and by an installed aiorchConfig.cmake, so both name
# the same targets in aiorch::aiorch's usage requirements.
find_package(PkgConfig REQUIRED QUIET)
if(NOT TARGET PkgConfig::AIORCH_LUA)
  pkg_check_modules(AIORCH_LUA REQUIRED QUIET IMPORTED_TARGET GLOBAL lua5.4)
endif()
if(NOT TARGET PkgConfig::AIORCH_CURL)
  pkg_check_modules(AIORCH_CURL REQUIRED QUIET IMPORTED_TARGET GLOBAL libcurl)
endif()
if(NOT TARGET PkgConfig::AIORCH_HIREDIS)
  pkg_check_modules(AIORCH_HIREDIS REQUIRED QUIET IMPORTED_TARGET GLOBAL hiredis)
endif()

# libev and http-parser have no pkg-config file on Debian.
foreach(dep ev http_parser)
  if(NOT TARGET aiorch::${dep})
    string(TOUPPER ${dep} DEP)
    if(dep STREQUAL "ev")
      set(header ev.h)
    else()
      set(header http_parser.h)
    endif()
    find_path(AIORCH_${DEP}_INCLUDE_DIR ${header} REQUIRED)
    find_library(AIORCH_${DEP}_LIBRARY ${dep} REQUIRED)
    add_library(aiorch::${dep} UNKNOWN IMPORTED GLOBAL)
    set_target_properties(aiorch::${dep} PROPERTIES
      IMPORTED_LOCATION "${AIORCH_${DEP}_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${AIORCH_${DEP}_INCLUDE_DIR}")
  endif()
endforeach()

find_package(Threads REQUIRED)
