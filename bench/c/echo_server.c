/* The physical floor of a framed round trip: a minimal Unix-socket server speaking the
 * vasipc framing (uint32 big-endian length + JSON body). It reads each request whole,
 * does not parse it, and answers with a fixed `health`-shaped JSON body; one thread per
 * connection, blocking I/O, one write per response.
 *
 *     cc -O2 -pthread -o echo_server echo_server.c && ./echo_server /tmp/floor.sock
 *
 * Part of bench/ (bench/floor.py builds and runs it); not a server for real use.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "uds_io.h"

#define MAX_BODY (1u << 20)

static const char BODY[] =
    "{\"op\":\"health\",\"status\":\"ok\",\"ready\":true,\"model_id\":\"bench\","
    "\"uptime_s\":1.0,\"in_flight\":0,\"requests_total\":0}";

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *body = malloc(MAX_BODY);
    char out[4 + sizeof BODY];
    uint32_t n = (uint32_t)(sizeof BODY - 1);
    out[0] = (char)(n >> 24);
    out[1] = (char)(n >> 16);
    out[2] = (char)(n >> 8);
    out[3] = (char)n;
    memcpy(out + 4, BODY, n);
    unsigned char head[4];
    while (body && read_full(fd, (char *)head, 4) == 0) {
        uint32_t len = ((uint32_t)head[0] << 24) | ((uint32_t)head[1] << 16) |
                       ((uint32_t)head[2] << 8) | (uint32_t)head[3];
        if (len == 0 || len > MAX_BODY || read_full(fd, body, len) != 0) {
            break;
        }
        if (write_full(fd, out, 4 + n) != 0) {
            break;
        }
    }
    free(body);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    unlink(argv[1]);
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(lfd, 128) != 0) {
        perror("echo_server");
        return 1;
    }
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) {
                continue;
            }
            perror("accept");
            return 1;
        }
        pthread_t th;
        if (pthread_create(&th, NULL, serve, (void *)(intptr_t)fd) != 0) {
            close(fd);
            continue;
        }
        pthread_detach(th);
    }
}
