/* Round-trip client for the floor benchmark: N connections (one thread each), each sends
 * `{"op":"health"}` framed (uint32 big-endian length + JSON) and waits for the whole
 * response before the next; per-request latency from clock_gettime(CLOCK_MONOTONIC).
 *
 *     cc -O2 -pthread -o rt_client rt_client.c
 *     ./rt_client SOCKET CONNECTIONS REQUESTS [WARMUP] [DURATION_S]
 *
 * REQUESTS round trips per connection after WARMUP untimed ones (default 100); with
 * DURATION_S > 0, each connection runs for that long instead (REQUESTS is then the cap).
 * Prints one line: `requests=.. elapsed_s=.. rps=.. p50_us=.. p90_us=.. p99_us=.. max_us=..`.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "uds_io.h"

static const char REQ[] = "{\"op\":\"health\"}";
static const char *g_path;
static long g_requests, g_warmup;
static double g_duration;
static pthread_barrier_t g_barrier;

typedef struct {
    double *lat_ns;
    long count;
    double t_start, t_end;
    int failed;
} worker_t;

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int round_trip(int fd, const char *msg, size_t msg_len, char *buf, size_t cap) {
    if (write_full(fd, msg, msg_len) != 0) {
        return -1;
    }
    unsigned char head[4];
    if (read_full(fd, (char *)head, 4) != 0) {
        return -1;
    }
    uint32_t len = ((uint32_t)head[0] << 24) | ((uint32_t)head[1] << 16) |
                   ((uint32_t)head[2] << 8) | (uint32_t)head[3];
    if (len == 0 || len > cap) {
        return -1;
    }
    return read_full(fd, buf, len);
}

static void *run(void *arg) {
    worker_t *w = arg;
    char msg[4 + sizeof REQ], buf[65536];
    uint32_t n = (uint32_t)(sizeof REQ - 1);
    msg[0] = (char)(n >> 24);
    msg[1] = (char)(n >> 16);
    msg[2] = (char)(n >> 8);
    msg[3] = (char)n;
    memcpy(msg + 4, REQ, n);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, g_path, sizeof addr.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        w->failed = 1;
    }
    for (long i = 0; i < g_warmup && !w->failed; i++) {
        if (round_trip(fd, msg, 4 + n, buf, sizeof buf) != 0) {
            w->failed = 1;
        }
    }
    pthread_barrier_wait(&g_barrier);
    w->t_start = now_ns();
    double stop = g_duration > 0 ? w->t_start + g_duration * 1e9 : 0;
    while (!w->failed && w->count < g_requests) {
        double t0 = now_ns();
        if (stop && t0 >= stop) {
            break;
        }
        if (round_trip(fd, msg, 4 + n, buf, sizeof buf) != 0) {
            w->failed = 1;
            break;
        }
        w->lat_ns[w->count++] = now_ns() - t0;
    }
    w->t_end = now_ns();
    if (fd >= 0) {
        close(fd);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *sorted, long n, double q) {
    if (n == 0) {
        return 0;
    }
    double pos = q / 100.0 * (double)(n - 1); /* linear, as numpy's default */
    long lo = (long)pos;
    long hi = lo + 1 < n ? lo + 1 : lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - (double)lo);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET CONNECTIONS REQUESTS [WARMUP] [DURATION_S]\n",
                argv[0]);
        return 2;
    }
    g_path = argv[1];
    int conns = atoi(argv[2]);
    g_requests = atol(argv[3]);
    g_warmup = argc > 4 ? atol(argv[4]) : 100;
    g_duration = argc > 5 ? atof(argv[5]) : 0;
    if (conns < 1 || g_requests < 1 || g_warmup < 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    worker_t *ws = calloc((size_t)conns, sizeof *ws);
    pthread_t *ths = calloc((size_t)conns, sizeof *ths);
    pthread_barrier_init(&g_barrier, NULL, (unsigned)conns);
    for (int i = 0; i < conns; i++) {
        ws[i].lat_ns = malloc((size_t)g_requests * sizeof(double));
        if (!ws[i].lat_ns) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        pthread_create(&ths[i], NULL, run, &ws[i]);
    }
    long total = 0;
    double t_start = 0, t_end = 0;
    for (int i = 0; i < conns; i++) {
        pthread_join(ths[i], NULL);
        if (ws[i].failed) {
            fprintf(stderr, "connection %d failed: %s\n", i, strerror(errno));
            return 1;
        }
        total += ws[i].count;
        if (i == 0 || ws[i].t_start < t_start) {
            t_start = ws[i].t_start;
        }
        if (ws[i].t_end > t_end) {
            t_end = ws[i].t_end;
        }
    }
    double *all = malloc((size_t)(total ? total : 1) * sizeof(double));
    long k = 0;
    for (int i = 0; i < conns; i++) {
        memcpy(all + k, ws[i].lat_ns, (size_t)ws[i].count * sizeof(double));
        k += ws[i].count;
    }
    qsort(all, (size_t)total, sizeof(double), cmp);
    double elapsed = (t_end - t_start) / 1e9;
    printf("requests=%ld elapsed_s=%.4f rps=%.1f p50_us=%.2f p90_us=%.2f p99_us=%.2f "
           "max_us=%.2f\n",
           total, elapsed, elapsed > 0 ? (double)total / elapsed : 0.0,
           pct(all, total, 50) / 1e3, pct(all, total, 90) / 1e3, pct(all, total, 99) / 1e3,
           total ? all[total - 1] / 1e3 : 0.0);
    return 0;
}
