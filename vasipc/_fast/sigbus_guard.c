/* sigbus_guard.c: SIGBUS becomes a return value inside vas_sigbus_guard_run() (see the .h). */
#define _GNU_SOURCE
#include "sigbus_guard.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>

/* The jump target of the innermost guard running on this thread, NULL outside guards.
 * initial-exec: the handler reads it, and the default (global-dynamic) model may call
 * __tls_get_addr, which can allocate on a thread's first access; not async-signal-safe. */
static __thread sigjmp_buf *volatile current_guard __attribute__((tls_model("initial-exec")));

static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static int installed;                   /* our handler is the SIGBUS disposition */
static struct sigaction previous;       /* what it was before us: the chain target */

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)context;
    sigjmp_buf *target = current_guard;
    if (target != NULL) {
        current_guard = NULL;
        siglongjmp(*target, 1);  /* restores the signal mask saved by sigsetjmp(.., 1) */
    }
    /* Not ours (no guard on this thread). Give SIGBUS back to its previous owner and let
     * it see this one: a fault re-executes the access on return and faults again under the
     * restored disposition, with its siginfo intact; a signal sent by kill() is re-sent
     * (it stays pending while this handler runs and arrives on return). The next guard
     * reinstalls us. */
    __atomic_store_n(&installed, 0, __ATOMIC_RELEASE);
    sigaction(SIGBUS, &previous, NULL);
    if (info == NULL || info->si_code <= 0)
        raise(sig);
}

static int ensure_installed(void)
{
    if (__atomic_load_n(&installed, __ATOMIC_ACQUIRE))
        return 0;
    int rc = 0;
    pthread_mutex_lock(&install_lock);
    if (!__atomic_load_n(&installed, __ATOMIC_ACQUIRE)) {
        struct sigaction ours;
        ours.sa_sigaction = on_sigbus;
        sigemptyset(&ours.sa_mask);
        /* SA_ONSTACK: a thread with an alternate stack (faulthandler sets one) keeps using it. */
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
        rc = sigaction(SIGBUS, &ours, &previous);
        if (rc == 0)
            __atomic_store_n(&installed, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&install_lock);
    return rc == 0 ? 0 : -1;
}

int vas_sigbus_guard_run(vas_guarded_fn fn, void *arg)
{
    if (ensure_installed() != 0)
        return VAS_GUARD_INSTALL_FAILED;
    sigjmp_buf here;
    sigjmp_buf *const outer = current_guard;  /* nesting: restored on both exits */
    if (sigsetjmp(here, 1) != 0) {
        current_guard = outer;
        return VAS_GUARD_SIGBUS;
    }
    current_guard = &here;
    fn(arg);
    current_guard = outer;
    return VAS_GUARD_OK;
}
