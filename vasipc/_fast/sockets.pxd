# <sys/socket.h> as connloop's epoll loop uses it: Cython's posix package declares
# none of it.

from posix.types cimport gid_t, pid_t, uid_t
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL
    enum: SOCK_NONBLOCK
    enum: SOCK_CLOEXEC
    enum: SOL_SOCKET
    enum: SO_PEERCRED
    # SO_PEERCRED's answer: the peer's pid and effective ids when it connected (Linux;
    # Python.h's _GNU_SOURCE makes the header declare it).
    struct ucred:
        pid_t pid
        uid_t uid
        gid_t gid
    # The peer's address is never wanted: both pointers are always NULL.
    int accept4(int fd, void *addr, void *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
