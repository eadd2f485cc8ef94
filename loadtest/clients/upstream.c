/*
 * upstream: the plaintext HTTP/1.1 server behind every terminator in loadtest/ (the same one
 * for all), cheap enough never to be the bottleneck. Compiled at run time by
 * loadtest/clients/build.py with `cc`.
 *
 *   upstream PORT PROCS      (PORT 0 picks a free port)
 *
 * Binds 127.0.0.1:PORT once per process with SO_REUSEPORT (so the kernel spreads connections
 * evenly), forks PROCS children each serving its own socket from one epoll loop, prints
 * "port <N>" on stdout and waits; SIGTERM or SIGINT stops the children and the parent. A child
 * also dies with its parent (PR_SET_PDEATHSIG).
 *
 * Requests: "GET /bytes/N" answers an N-byte body; any other path a small fixed body. A
 * request with "Connection: close" gets its response, then a FIN; otherwise the connection
 * stays open for the next request (keep-alive, no pipelining needed but tolerated).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PROCS 16
#define SMALL_BODY "hello from the loadtest upstream: a small, fixed response body.\n"

struct conn {
    int fd;
    char req[2048];
    size_t rlen;
    char head[160];
    size_t head_len, head_off;
    long long body_left;
    int small; /* the body comes from SMALL_BODY, else from the block of 'x' */
    int closing; /* response sent with Connection: close: FIN sent, waiting for the peer's */
    int close_after;
    int writing;
};

static char body[1 << 18];

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) {
        perror("upstream: bind/listen");
        exit(1);
    }
    return fd;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void set_events(int ep, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Start the response to the complete request at the head of c->req; returns its length. */
static size_t begin_response(struct conn *c, const char *end) {
    size_t req_len = (size_t)(end + 4 - c->req);
    long long n = (long long)sizeof SMALL_BODY - 1;
    c->small = strncmp(c->req, "GET /bytes/", 11) != 0;
    if (!c->small) n = atoll(c->req + 11);
    c->req[req_len - 1] = 0; /* search the header block only */
    c->close_after = strcasestr(c->req, "\r\nconnection: close") != NULL;
    c->head_len = (size_t)snprintf(c->head, sizeof c->head,
                                   "HTTP/1.1 200 OK\r\nContent-Length: %lld\r\n"
                                   "Content-Type: text/plain\r\n%s\r\n",
                                   n, c->close_after ? "Connection: close\r\n" : "");
    c->head_off = 0;
    c->body_left = n;
    c->writing = 1;
    return req_len;
}

/* Write what can be written; returns -1 when the connection must go. */
static int pump_write(int ep, struct conn *c) {
    while (c->writing) {
        struct iovec iov[2];
        int k = 0;
        if (c->head_off < c->head_len) {
            iov[k].iov_base = c->head + c->head_off;
            iov[k++].iov_len = c->head_len - c->head_off;
        }
        if (c->body_left > 0) {
            const char *src = body;
            size_t len = sizeof body;
            if (c->small) {
                src = SMALL_BODY + (sizeof SMALL_BODY - 1 - (size_t)c->body_left);
                len = (size_t)c->body_left;
            }
            if ((long long)len > c->body_left) len = (size_t)c->body_left;
            iov[k].iov_base = (void *)src;
            iov[k++].iov_len = len;
        }
        if (k == 0) {
            c->writing = 0;
            break;
        }
        ssize_t n = writev(c->fd, iov, k);
        if (n < 0) {
            if (errno == EAGAIN) {
                set_events(ep, c, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        size_t left = (size_t)n;
        size_t h = c->head_len - c->head_off;
        if (left >= h) {
            c->head_off = c->head_len;
            left -= h;
        } else {
            c->head_off += left;
            left = 0;
        }
        c->body_left -= (long long)left;
    }
    if (c->close_after) {
        shutdown(c->fd, SHUT_WR);
        c->closing = 1;
    }
    set_events(ep, c, EPOLLIN);
    return 0;
}

/* Serve every complete request in the buffer; returns -1 when the connection must go. */
static int serve(int ep, struct conn *c) {
    while (!c->writing && !c->closing) {
        c->req[c->rlen] = 0;
        char *end = strstr(c->req, "\r\n\r\n");
        if (!end) return c->rlen >= sizeof c->req - 1 ? -1 : 0;
        size_t used = begin_response(c, end);
        memmove(c->req, c->req + used, c->rlen - used);
        c->rlen -= used;
        if (pump_write(ep, c) < 0) return -1;
    }
    return 0;
}

static void on_readable(int ep, struct conn *c) {
    for (;;) {
        if (c->closing || c->rlen >= sizeof c->req - 1) {
            char sink[4096];
            ssize_t n = read(c->fd, sink, sizeof sink);
            if (n > 0 && c->closing) continue;
            if (n < 0 && errno == EAGAIN) return;
            drop(ep, c); /* EOF after our FIN, an error, or an oversized request */
            return;
        }
        ssize_t n = read(c->fd, c->req + c->rlen, sizeof c->req - 1 - c->rlen);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            drop(ep, c);
            return;
        }
        if (n < 0) return;
        c->rlen += (size_t)n;
        if (!c->writing && serve(ep, c) < 0) {
            drop(ep, c);
            return;
        }
        if (c->writing) return; /* resume reading once the response is out */
    }
}

static void serve_forever(int lfd) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    c = calloc(1, sizeof *c);
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (c->writing) {
                if (pump_write(ep, c) < 0 || (!c->writing && serve(ep, c) < 0)) {
                    drop(ep, c);
                    continue;
                }
                if (!c->writing && (evs[i].events & EPOLLIN)) on_readable(ep, c);
            } else {
                on_readable(ep, c);
            }
        }
    }
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: upstream PORT PROCS\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int procs = atoi(argv[2]);
    if (procs < 1 || procs > MAX_PROCS) procs = 1;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(body, 'x', sizeof body);
    int fds[MAX_PROCS];
    fds[0] = listen_on(port);
    if (port == 0) {
        struct sockaddr_in a;
        socklen_t len = sizeof a;
        getsockname(fds[0], (struct sockaddr *)&a, &len);
        port = ntohs(a.sin_port);
    }
    for (int i = 1; i < procs; i++) fds[i] = listen_on(port);

    pid_t kids[MAX_PROCS];
    pid_t parent = getpid();
    for (int i = 0; i < procs; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(1);
            signal(SIGTERM, SIG_DFL);
            for (int j = 0; j < procs; j++)
                if (j != i) close(fds[j]);
            serve_forever(fds[i]);
            _exit(0);
        }
    }
    for (int i = 0; i < procs; i++) close(fds[i]);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("port %d\n", port);
    fflush(stdout);
    while (!stop) {
        int status;
        pid_t p = waitpid(-1, &status, 0);
        if (p > 0) break; /* a child died: stop everything */
        if (p < 0 && errno != EINTR) break;
    }
    for (int i = 0; i < procs; i++) kill(kids[i], SIGTERM);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
    }
    return 0;
}
