/* vas_debug.h: checks that cost time, compiled in only with VASIPC_DEBUG
 * (`python build.py --debug`), as asyncpg's debug build does. They guard invariants
 * the Python layer already established (indices inside the frame, counts inside the
 * buffers), so a release build skips them; a debug run of the test suite proves them. */
#ifndef VAS_DEBUG_H
#define VAS_DEBUG_H

#ifdef VASIPC_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define VAS_DEBUG_ASSERT(cond)                                                        \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "vasipc debug check failed: %s (%s:%d)\n", #cond, __FILE__, \
                    __LINE__);                                                        \
            abort();                                                                  \
        }                                                                             \
    } while (0)
#else
#define VAS_DEBUG_ASSERT(cond) ((void)0)
#endif

#endif
