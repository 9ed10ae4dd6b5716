/* uds_io.h: whole-buffer read and write on a blocking socket, shared by the bench's C
 * echo server and C round-trip client. */
#ifndef UDS_IO_H
#define UDS_IO_H

#include <errno.h>
#include <stddef.h>
#include <unistd.h>

/* 0 once n bytes are read; -1 on EOF or an error (EINTR is retried). */
static inline int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r > 0) {
            got += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else {
            return -1;
        }
    }
    return 0;
}

/* 0 once n bytes are written; -1 on an error (EINTR is retried). */
static inline int write_full(int fd, const char *buf, size_t n) {
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w > 0) {
            put += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            return -1;
        }
    }
    return 0;
}

#endif
