/* sigbus_guard.h: run a function so that a bus error in it is an error code, not a crash.
 *
 * A frame is read through a shared mapping of a file that another process owns. If that
 * process truncates the file while we read, the next access to a page past the new end
 * raises SIGBUS, which by default kills the server. vas_sigbus_guard_run() turns that
 * into a return value for the thread that faulted, and leaves every other SIGBUS (other
 * threads, code outside a guard) to whatever handled it before: faulthandler, the default
 * action, a sanitizer.
 *
 * The guarded function is abandoned midway (siglongjmp), so it must own nothing that needs
 * releasing: no malloc, no locks, no Python API. Allocate before, free after.
 * Reused by the letterbox kernel and the GPU path's pinned-memory copy.
 */
#ifndef VASIPC_SIGBUS_GUARD_H
#define VASIPC_SIGBUS_GUARD_H

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*vas_guarded_fn)(void *arg);

enum {
    VAS_GUARD_OK = 0,              /* fn returned normally */
    VAS_GUARD_SIGBUS = 1,          /* a SIGBUS hit this thread inside fn; fn was abandoned */
    VAS_GUARD_INSTALL_FAILED = -1  /* sigaction() failed (errno says why); fn did not run */
};

/* Runs fn(arg) under the guard. Thread-safe and nestable; installs the process-wide
 * SIGBUS handler on first use (lazily, so it sits on top of handlers installed at
 * start-up, e.g. faulthandler's, and chains to them). */
int vas_sigbus_guard_run(vas_guarded_fn fn, void *arg);

#ifdef __cplusplus
}
#endif

#endif /* VASIPC_SIGBUS_GUARD_H */
