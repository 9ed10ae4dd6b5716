# The compiled core: one extension per job. VASIPC_ONLY (a ;-list) builds a subset,
# for working on one kernel while another is half-edited.
set(VASIPC_ONLY "" CACHE STRING "Build only these _fast modules")

macro(vasipc_module name)
  if(NOT VASIPC_ONLY OR "${name}" IN_LIST VASIPC_ONLY)
    vasipc_cython_module(${name} ${ARGN})
  endif()
endmacro()

vasipc_module(framing)
vasipc_module(frameview)
vasipc_module(letterbox SOURCES ${FAST_DIR}/letterbox_kernel.c ${FAST_DIR}/sigbus_guard.c)
vasipc_module(decode SOURCES ${FAST_DIR}/decode_kernel.c ${FAST_DIR}/rotated_nms.c)
vasipc_module(connloop)
vasipc_module(masks SOURCES ${FAST_DIR}/mask_kernel.c)
