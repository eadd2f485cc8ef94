/*
 * tlsload: a cheap TLS load client for loadtest/ (one process, one epoll loop, non-blocking
 * OpenSSL). Compiled at run time by loadtest/clients/build.py with `cc ... -lssl -lcrypto`.
 *
 *   tlsload --mode full|resumed|keepalive|bulk|idle --port P [options]
 *
 * Modes:
 *   full       a new TCP+TLS connection per request, never a session offered (full handshakes);
 *              the request says "Connection: close", the client reads the response, waits for
 *              the server's close (close_notify or FIN), sends its close_notify and closes.
 *   resumed    as full, but every connection offers one saved session (refreshed only when the
 *              server declines it): one connection runs alone first to get it, so every later
 *              handshake resumes.
 *   keepalive  --conns long-lived connections, one small request at a time on each.
 *   bulk       as keepalive, with large responses (--path /bytes/N).
 *   idle       open --conns connections (handshake and one request each, at most --ramp
 *              connecting at once), print "READY <established> <errors>" on stdout, hold them
 *              until stdin reaches EOF or --hold seconds pass, then exit.
 *
 * Bounds: no new request starts after --duration seconds or after --max requests; work still
 * in flight --grace seconds later is counted as "unfinished"; a connection making no progress
 * for --timeout seconds is counted as "timeout". --rate caps new requests per second.
 *
 * Output: one JSON object on stdout: counts, errors by kind, TLS facts, and two latency
 * histograms (per request and per handshake) as [[lower_bound_us, count], ...] buckets with
 * 64 linear sub-buckets per power of two (about 1.6% resolution); the caller merges them.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { M_FULL, M_RESUMED, M_KEEPALIVE, M_BULK, M_IDLE };
enum state { S_FREE, S_CONNECT, S_HANDSHAKE, S_WRITE, S_READ, S_EOF, S_IDLE };
enum err { E_CONNECT, E_HANDSHAKE, E_IO, E_PROTOCOL, E_TIMEOUT, E_CLOSED, E_UNFINISHED, E_N };
static const char *ERR_NAMES[E_N] = {"connect", "handshake", "io",      "protocol",
                                     "timeout", "closed",    "unfinished"};

#define SUB_BITS 6
#define SUB (1 << SUB_BITS)
#define NBUCKETS (64 * SUB)
#define IN_BIT 1u
#define OUT_BIT 2u
#define STDIN_TAG 0xffffffffu

struct conn {
    int fd;
    SSL *ssl;
    int st;
    unsigned events;     /* what epoll watches for this fd */
    uint64_t t_conn;     /* ns: connect() called */
    uint64_t t_req;      /* ns: request started */
    uint64_t t_progress; /* ns: last progress, for --timeout */
    char hdr[1024];
    size_t hlen;
    int hdone;
    long long body_left;
    long long resp_bytes;
};

/* options */
static int mode = M_FULL;
static const char *host = "127.0.0.1";
static int port = 0;
static int nconns = 32;
static double duration = 5.0;
static long long max_requests = 1000000;
static double rate = 0.0;
static double timeout_s = 10.0;
static double grace = 10.0;
static double hold = 60.0;
static int ramp = 200;
static const char *path = "/";
static const char *sni = "localhost";
static int tls12 = 0;

/* state */
static SSL_CTX *ctx;
static SSL_SESSION *saved;
static int primed; /* resumed: the first connection has finished */
static struct conn *conns;
static int ep;
static struct sockaddr_in addr;
static char request[512];
static int request_len;
static unsigned char rbuf[1 << 16];
static uint64_t t0, t_stop, t_hard;

/* results */
static long long started, requests, handshakes, reused, bytes, errors[E_N];
static long long established, setup_errors, connecting, unclean_closes;
static uint64_t lat_hist[NBUCKETS], hs_hist[NBUCKETS];
static char tls_version[32], tls_cipher[64], tls_group[32];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int bucket(uint64_t us) {
    if (us < SUB) return (int)us;
    int e = 63 - __builtin_clzll(us);
    int shift = e - SUB_BITS;
    int sub = (int)(us >> shift) - SUB;
    return (e - SUB_BITS + 1) * SUB + sub;
}

static uint64_t bucket_low(int b) {
    if (b < SUB) return (uint64_t)b;
    int e = b / SUB + SUB_BITS - 1;
    return (uint64_t)(SUB + b % SUB) << (e - SUB_BITS);
}

static void record(uint64_t *hist, uint64_t from, uint64_t to) {
    hist[bucket((to - from) / 1000)]++;
}

static void watch(struct conn *c, unsigned want) {
    if (c->events == want) return;
    struct epoll_event ev = {0};
    ev.events = ((want & IN_BIT) ? EPOLLIN : 0) | ((want & OUT_BIT) ? EPOLLOUT : 0);
    ev.data.u32 = (uint32_t)(c - conns);
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = want;
}

static void close_conn(struct conn *c, int send_notify) {
    if (c->ssl) {
        if (send_notify) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd); /* also removes it from epoll */
    c->fd = -1;
    c->st = S_FREE;
    c->events = 0;
}

static void fail(struct conn *c, int kind) {
    errors[kind]++;
    if (mode == M_IDLE && c->st != S_IDLE) {
        setup_errors++;
        connecting--;
    }
    ERR_clear_error();
    close_conn(c, 0);
}

static int may_start(uint64_t now) {
    if (mode == M_IDLE) return 1;
    if (now >= t_stop || started >= max_requests) return 0;
    if (rate > 0.0 && (double)started >= rate * (double)(now - t0) / 1e9 + 1.0) return 0;
    return 1;
}

static void step(struct conn *c);

static void start_conn(struct conn *c, uint64_t now) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->t_conn = now;
    c->t_progress = now;
    c->hlen = 0;
    c->hdone = 0;
    if (mode != M_KEEPALIVE && mode != M_BULK && mode != M_IDLE) started++;
    if (fd < 0) {
        errors[E_CONNECT]++;
        if (mode == M_IDLE) setup_errors++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->st = S_CONNECT;
    if (mode == M_IDLE) connecting++;
    struct epoll_event ev = {0};
    ev.events = EPOLLOUT;
    ev.data.u32 = (uint32_t)(c - conns);
    c->events = OUT_BIT;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(c, E_CONNECT);
        return;
    }
}

static void begin_request(struct conn *c, uint64_t now) {
    if (mode == M_KEEPALIVE || mode == M_BULK) started++;
    c->t_req = now;
    c->hlen = 0;
    c->hdone = 0;
    c->body_left = 0;
    c->resp_bytes = 0;
    c->st = S_WRITE;
}

static void handshake_done(struct conn *c, uint64_t now) {
    handshakes++;
    record(hs_hist, c->t_conn, now);
    if (SSL_session_reused(c->ssl)) reused++;
    if (!tls_version[0]) {
        snprintf(tls_version, sizeof tls_version, "%s", SSL_get_version(c->ssl));
        snprintf(tls_cipher, sizeof tls_cipher, "%s", SSL_get_cipher_name(c->ssl));
        const char *g = SSL_group_to_name(c->ssl, SSL_get_negotiated_group(c->ssl));
        snprintf(tls_group, sizeof tls_group, "%s", g ? g : "?");
    }
    begin_request(c, now);
    if (mode == M_FULL || mode == M_RESUMED) c->t_req = c->t_conn; /* latency: whole connection */
}

/* Parse what arrived; returns 1 when the response is complete, -1 on a protocol error. */
static int consume(struct conn *c, const unsigned char *p, size_t n) {
    c->resp_bytes += (long long)n;
    if (!c->hdone) {
        size_t room = sizeof c->hdr - 1 - c->hlen;
        size_t take = n < room ? n : room;
        memcpy(c->hdr + c->hlen, p, take);
        c->hlen += take;
        c->hdr[c->hlen] = 0;
        char *end = strstr(c->hdr, "\r\n\r\n");
        if (!end) return c->hlen >= sizeof c->hdr - 1 ? -1 : 0;
        if (strncmp(c->hdr, "HTTP/1.1 200", 12) != 0) return -1;
        char *cl = strcasestr(c->hdr, "\r\ncontent-length:");
        if (!cl) return -1;
        long long len = atoll(cl + 17);
        size_t head = (size_t)(end + 4 - c->hdr);
        size_t before = c->hlen - take; /* header bytes held before this chunk */
        long long body_here = (long long)(before + n) - (long long)head;
        c->hdone = 1;
        c->body_left = len - body_here;
    } else {
        c->body_left -= (long long)n;
    }
    if (c->body_left < 0) return -1;
    return c->body_left == 0;
}

static void response_done(struct conn *c, uint64_t now) {
    requests++;
    bytes += c->resp_bytes;
    record(lat_hist, c->t_req, now);
    primed = 1;
    if (mode == M_RESUMED && (saved == NULL || !SSL_session_reused(c->ssl))) {
        SSL_SESSION *s = SSL_get1_session(c->ssl);
        if (s && SSL_SESSION_is_resumable(s)) {
            if (saved) SSL_SESSION_free(saved);
            saved = s;
        } else if (s) {
            SSL_SESSION_free(s);
        }
    }
    if (mode == M_FULL || mode == M_RESUMED) {
        c->st = S_EOF; /* wait for the server's close, then close_notify and close */
    } else if (mode == M_IDLE) {
        c->st = S_IDLE;
        established++;
        connecting--;
        watch(c, IN_BIT);
    } else if (may_start(now)) {
        begin_request(c, now);
    } else {
        close_conn(c, 1);
    }
}

static void step(struct conn *c) {
    uint64_t now = now_ns();
    for (;;) {
        int r, e;
        switch (c->st) {
        case S_CONNECT: {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                fail(c, E_CONNECT);
                return;
            }
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_connect_state(c->ssl);
            SSL_set_tlsext_host_name(c->ssl, sni);
            if (mode == M_RESUMED && saved) SSL_set_session(c->ssl, saved);
            c->st = S_HANDSHAKE;
            c->t_progress = now;
            break;
        }
        case S_HANDSHAKE:
            r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                c->t_progress = now;
                handshake_done(c, now);
                break;
            }
            e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) {
                watch(c, IN_BIT);
                return;
            }
            if (e == SSL_ERROR_WANT_WRITE) {
                watch(c, OUT_BIT);
                return;
            }
            fail(c, E_HANDSHAKE);
            return;
        case S_WRITE:
            r = SSL_write(c->ssl, request, request_len);
            if (r > 0) {
                c->st = S_READ;
                c->t_progress = now;
                break;
            }
            e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) {
                watch(c, IN_BIT);
                return;
            }
            if (e == SSL_ERROR_WANT_WRITE) {
                watch(c, OUT_BIT);
                return;
            }
            fail(c, E_IO);
            return;
        case S_READ:
        case S_EOF:
        case S_IDLE:
            r = SSL_read(c->ssl, rbuf, sizeof rbuf);
            if (r > 0) {
                c->t_progress = now;
                if (c->st != S_READ) {
                    fail(c, E_PROTOCOL); /* bytes after the response */
                    return;
                }
                int done = consume(c, rbuf, (size_t)r);
                if (done < 0) {
                    fail(c, E_PROTOCOL);
                    return;
                }
                if (done) {
                    response_done(c, now);
                    if (c->st == S_FREE || c->st == S_IDLE) return;
                }
                break;
            }
            e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) {
                watch(c, IN_BIT);
                return;
            }
            if (e == SSL_ERROR_WANT_WRITE) {
                watch(c, OUT_BIT);
                return;
            }
            if (c->st == S_EOF) {
                /* The server closed after a complete response: the expected end. Anything but
                 * a close_notify (a reset, a bare FIN) is counted, not treated as a failure. */
                if (e != SSL_ERROR_ZERO_RETURN) unclean_closes++;
                ERR_clear_error();
                close_conn(c, e == SSL_ERROR_ZERO_RETURN);
                return;
            }
            fail(c, c->st == S_IDLE ? E_CLOSED : E_IO);
            return;
        default:
            return;
        }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: tlsload --mode full|resumed|keepalive|bulk|idle --port P [--host H]\n"
            "  [--conns N] [--duration S] [--max N] [--rate R] [--timeout S] [--grace S]\n"
            "  [--hold S] [--ramp N] [--path P] [--sni NAME] [--tls12]\n");
    exit(2);
}

static void parse(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--tls12")) {
            tls12 = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "full")) mode = M_FULL;
            else if (!strcmp(v, "resumed")) mode = M_RESUMED;
            else if (!strcmp(v, "keepalive")) mode = M_KEEPALIVE;
            else if (!strcmp(v, "bulk")) mode = M_BULK;
            else if (!strcmp(v, "idle")) mode = M_IDLE;
            else usage();
        } else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--max")) max_requests = atoll(v);
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--grace")) grace = atof(v);
        else if (!strcmp(a, "--hold")) hold = atof(v);
        else if (!strcmp(a, "--ramp")) ramp = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--sni")) sni = v;
        else usage();
    }
    if (port <= 0 || nconns <= 0 || ramp <= 0) usage();
}

static void print_hist(const char *name, const uint64_t *hist) {
    printf("\"%s\":[", name);
    int first = 1;
    for (int b = 0; b < NBUCKETS; b++) {
        if (!hist[b]) continue;
        printf("%s[%llu,%llu]", first ? "" : ",", (unsigned long long)bucket_low(b),
               (unsigned long long)hist[b]);
        first = 0;
    }
    printf("]");
}

static void report(uint64_t end) {
    static const char *names[] = {"full", "resumed", "keepalive", "bulk", "idle"};
    long long total = 0;
    for (int k = 0; k < E_N; k++) total += errors[k];
    printf("{\"mode\":\"%s\",\"elapsed\":%.6f,\"started\":%lld,\"requests\":%lld,"
           "\"handshakes\":%lld,\"reused\":%lld,\"bytes\":%lld,\"established\":%lld,"
           "\"unclean_closes\":%lld,\"errors\":%lld,\"error_kinds\":{",
           names[mode], (double)(end - t0) / 1e9, started, requests, handshakes, reused, bytes,
           established, unclean_closes, total);
    int first = 1;
    for (int k = 0; k < E_N; k++) {
        if (!errors[k]) continue;
        printf("%s\"%s\":%lld", first ? "" : ",", ERR_NAMES[k], errors[k]);
        first = 0;
    }
    printf("},\"tls\":{\"version\":\"%s\",\"cipher\":\"%s\",\"group\":\"%s\"},", tls_version,
           tls_cipher, tls_group);
    print_hist("latency_us", lat_hist);
    printf(",");
    print_hist("handshake_us", hs_hist);
    printf("}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    parse(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) usage();
    request_len = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n", path,
                           sni, (mode == M_FULL || mode == M_RESUMED) ? "Connection: close\r\n" : "");

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (tls12) SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x08http/1.1", 9);
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF); /* a bare FIN reads as EOF */
    if (mode == M_IDLE) SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);

    conns = calloc((size_t)nconns, sizeof *conns);
    if (!conns) return 1;
    for (int i = 0; i < nconns; i++) conns[i].fd = -1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[256];

    int stdin_watched = 0;
    if (mode == M_IDLE) {
        struct epoll_event ev = {0};
        ev.events = EPOLLIN;
        ev.data.u32 = STDIN_TAG;
        stdin_watched = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) == 0;
    }

    t0 = now_ns();
    t_stop = t0 + (uint64_t)(duration * 1e9);
    t_hard = t_stop + (uint64_t)(grace * 1e9);
    uint64_t last_scan = t0;
    int next = 0; /* idle: next connection to open */
    int ready_printed = 0;
    uint64_t hold_until = 0;
    int released = 0;

    for (;;) {
        uint64_t now = now_ns();
        int active = 0;
        if (mode == M_IDLE) {
            while (!ready_printed && next < nconns && connecting < ramp && now < t_stop) {
                start_conn(&conns[next], now);
                if (conns[next].st != S_FREE) step(&conns[next]);
                next++;
            }
            if (!ready_printed &&
                ((next >= nconns && connecting == 0) || (now >= t_stop && connecting == 0))) {
                printf("READY %lld %lld\n", established, setup_errors);
                fflush(stdout);
                ready_printed = 1;
                hold_until = now + (uint64_t)(hold * 1e9);
            }
            if (ready_printed && (released || now >= hold_until)) break;
            if (now >= t_hard + (uint64_t)(hold * 1e9)) break;
        } else {
            for (int i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                /* resumed: one connection first, to get the session every later one offers */
                if (mode == M_RESUMED && !primed && active) {
                    if (c->st != S_FREE) active++;
                    continue;
                }
                if (c->st == S_FREE && may_start(now)) {
                    start_conn(c, now);
                    if (c->st != S_FREE) step(c);
                }
                if (c->st != S_FREE) active++;
            }
            if (!active && (now >= t_stop || started >= max_requests)) break;
            if (now >= t_hard) {
                for (int i = 0; i < nconns; i++)
                    if (conns[i].st != S_FREE) fail(&conns[i], E_UNFINISHED);
                break;
            }
        }
        if (now - last_scan > 100000000u) { /* timeouts, every 100 ms */
            last_scan = now;
            uint64_t limit = (uint64_t)(timeout_s * 1e9);
            for (int i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                if (c->st != S_FREE && c->st != S_IDLE && now > c->t_progress &&
                    now - c->t_progress > limit)
                    fail(c, E_TIMEOUT);
            }
        }
        int wait_ms = 100;
        if (rate > 0.0 && mode != M_IDLE) {
            double due = (double)t0 + (double)started / rate * 1e9;
            double ms = (due - (double)now) / 1e6;
            if (ms < wait_ms) wait_ms = ms < 0 ? 0 : (int)ms + 1;
        }
        int n = epoll_wait(ep, evs, 256, wait_ms);
        for (int k = 0; k < n; k++) {
            uint32_t id = evs[k].data.u32;
            if (id == STDIN_TAG) {
                char tmp[256];
                ssize_t got = read(0, tmp, sizeof tmp);
                if (got <= 0) {
                    released = 1;
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                }
                continue;
            }
            struct conn *c = &conns[id];
            if (c->st != S_FREE) step(c);
        }
    }
    (void)stdin_watched;
    report(now_ns());
    return 0;
}
