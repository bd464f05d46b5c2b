/*
 * wsclient: a small epoll WebSocket load client for pushd's /ws endpoint.
 *
 * Single-threaded and non-blocking. It opens --conns connections (bound to the
 * --src source addresses in turn, so more than 64k client ports are possible),
 * does the RFC 6455 opening handshake, waits for the {"type":"subscribed"}
 * frame on each and then prints one line on stdout:
 *
 *     ready <subscribed> failed <failed>
 *
 * From then on it counts {"type":"message"} frames. A message's data is
 * expected to carry a send timestamp, {"t": <CLOCK_REALTIME>, ...}, in
 * microseconds (ns and ms are recognised by magnitude); the client records the
 * latency now - t of every delivery in a log-linear histogram (exact below
 * 128 us, then 64 sub-buckets per power of two: < 1.6 % bucket width).
 *
 * Reports are single JSON lines on stdout (see report()); they cover the
 * "window" since "ready" or since the previous report, including the CPU time
 * the client used in that window (getrusage), so a run can show the client is
 * not the bottleneck. A report is printed
 *   - at the end: SIGINT/SIGTERM, --duration seconds after ready, --expect
 *     deliveries reached, or (with --control) "quit"/EOF on stdin;
 *   - on SIGUSR1, or on the control commands below (then the window resets).
 *
 * Control commands (--control; one per line on stdin):
 *     stats                      report now and reset the window
 *     expect N IDLE_MS MAX_MS    report (and reset) once the window has N
 *                                deliveries, or deliveries started and then
 *                                none came for IDLE_MS, or MAX_MS passed
 *     quit                       final report, exit
 *
 * Pings (opcode 0x9) are answered with masked pongs; a close frame is answered
 * with a masked close echoing the code and the connection is closed; the codes
 * are counted in the report. Frames from the client are masked (RFC 6455 5.3).
 *
 * --idle only holds the connections (messages are counted, never parsed).
 *
 * --raw is for servers without pushd's frames (Nchan's WebSocket subscriber,
 * which sends each published body as it is): a connection counts as subscribed
 * once the server answered the handshake with 101, and every text or binary
 * frame is a delivery, whose send timestamp is the first "t": in the frame (in
 * pushd's frames, the first after "data":).
 *
 * --stall S ends the connect phase early: when no connection got subscribed (or
 * failed for good) for S seconds while some are still waiting, "ready" is
 * printed with the ones open so far (the others stay in flight). For a server
 * that stops accepting (out of file descriptors, say): how many it holds.
 *
 * --catchup N measures recovery: every connection (opened with a path like
 * /ws?channel=c&since=<id>) must get its "subscribed" frame and then N message
 * frames; the time from its connect() to the subscribed frame and to the N-th
 * message is recorded (two histograms, us), the connection is closed with a
 * close frame (code 1000), and its slot goes to the next connection. --inflight
 * is then the number of clients catching up at once (1: one after another,
 * --conns: all at once). Message ids must increase on each connection. When
 * every connection is done (or failed) it prints "done <n> failed <n>" and the
 * final report, which has a "catchup" object.
 *
 * --ids FIRST,LAST (with --catchup): the first message of every connection must
 * have id FIRST and its N-th id LAST; each that does not counts in "wrong_ends".
 * With increasing ids (no "disorder") and N ids in [FIRST, LAST] on the channel,
 * every connection then got every one of those messages exactly once.
 *
 * The Sec-WebSocket-Key is fixed (the RFC's sample nonce) so the expected
 * Sec-WebSocket-Accept is a constant and the client needs no SHA-1; the server
 * does not care. This is a benchmark tool, not a general client.
 *
 * Build: gcc -O2 -o bench/bin/wsclient bench/wsclient.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
#define MAX_FRAME (16u << 20)
#define MAX_HEADER 16384
#define RBUF_SIZE (256 * 1024)
#define NBUCKETS (64 * 42)
#define TAG_SIGNAL UINT64_MAX
#define TAG_STDIN (UINT64_MAX - 1)

enum {
    ST_IDLE, ST_CONNECTING, ST_HANDSHAKE, ST_WAIT_SUB, ST_OPEN, ST_CLOSED,
    ST_CLOSING, ST_DONE /* --catchup: close frame sent; caught up and closed */
};

typedef struct {
    int fd;
    uint8_t state;
    uint8_t retries;
    uint8_t frag_op;
    uint8_t want_out;
    uint16_t src;
    uint32_t win_count;
    uint8_t *rbuf;
    uint32_t rlen, rcap;
    uint8_t *wbuf;
    uint32_t wlen, wcap;
    uint8_t *frag;
    uint32_t flen, fcap;
    /* --catchup */
    int64_t t0_ns;       /* CLOCK_MONOTONIC at the first connect() */
    uint32_t cu_count;   /* messages received */
    uint32_t last_seq;   /* id of the last message, to check the order */
    uint64_t last_ms;
} conn_t;

typedef struct {
    uint64_t n, min, max, sum;
    uint64_t hist[NBUCKETS];
} hist_t;

/* ---- options */
static const char *opt_host = "127.0.0.1";
static int opt_port = 8080;
static const char *opt_path = "/ws?channel=bench";
static int opt_conns = 1;
static double opt_rate = 2000;     /* connects per second, 0: unlimited */
static int opt_inflight = 256;     /* connections between connect() and "subscribed" */
static int opt_retries = 3;
static double opt_connect_timeout = 300;
static double opt_duration = 0;    /* after ready; 0: none */
static uint64_t opt_expect = 0;    /* total deliveries; 0: none */
static int opt_idle = 0;
static int opt_control = 0;
static const char *opt_label = "";
static uint32_t opt_catchup = 0;   /* messages each connection waits for, then closes */
static int opt_raw = 0;            /* no pushd envelope: open at 101, every frame a delivery */
static double opt_stall = 0;       /* connect phase: print ready after S s without progress */
static int opt_ids = 0;            /* --ids: the first and N-th message ids to check */
static uint64_t ids_first_ms, ids_first_seq, ids_last_ms, ids_last_seq;

/* ---- state */
static conn_t *conns;
static struct sockaddr_in *srcs;
static int nsrcs;
static struct sockaddr_in server;
static int ep;
static int *todo; /* stack of conn indexes waiting to connect */
static int ntodo;
static int inflight, nopen, nfailed, nclosed, nready_printed;
static int done; /* leave the event loop */
static uint64_t connect_errors, handshake_errors;
static char hs_request[1024];
static int hs_len;
static uint8_t rbuf_global[RBUF_SIZE];
static uint64_t rng = 0x9E3779B97F4A7C15ull;

/* close codes seen (after ready or before) */
#define NCODES 16
static struct { int code; uint64_t n; } close_codes[NCODES];

/* window statistics */
static struct {
    uint64_t deliveries, other_frames, pings, bytes, bad_t, negative;
    int64_t first_ns, last_ns; /* CLOCK_REALTIME of first/last delivery */
    uint64_t lat_min, lat_max, lat_sum, lat_n;
    uint64_t hist[NBUCKETS];
    double cpu0, wall0; /* at window start */
} w;
static uint64_t total_deliveries;
static double last_delivery_mono;

/* --catchup: connect -> subscribed and connect -> N-th message, us */
static hist_t cu_sub, cu_done;
static uint64_t cu_recovered, cu_not_recovered, cu_disorder, cu_extra, cu_bad_id, cu_wrong_ends;
static int ndone;
static int64_t cu_first_ns, cu_last_ns; /* CLOCK_MONOTONIC: first connect, last done */

/* expect command */
static int expect_armed;
static uint64_t expect_n;
static double expect_idle, expect_max, expect_t0;
static double ready_at;
static double progress_at; /* the last connection subscribed or failed for good (--stall) */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static uint32_t rnd32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static inline int hbucket(uint64_t v) {
    if (v < 128) return (int)v;
    int e = 63 - __builtin_clzll(v);
    int shift = e - 6;
    int b = shift * 64 + (int)(v >> shift);
    return b < NBUCKETS ? b : NBUCKETS - 1;
}

static inline uint64_t hlow(int b) {
    if (b < 128) return (uint64_t)b;
    int shift = b / 64 - 1;
    return (uint64_t)(b - shift * 64) << shift;
}

static void hist_add(hist_t *h, uint64_t v) {
    if (!h->n || v < h->min) h->min = v;
    if (v > h->max) h->max = v;
    h->sum += v;
    h->n++;
    h->hist[hbucket(v)]++;
}

static void hist_print(const char *name, const hist_t *h) {
    printf("\"%s\":{\"n\":%" PRIu64 ",\"min\":%" PRIu64 ",\"max\":%" PRIu64 ",\"sum\":%" PRIu64
           ",\"hist\":[",
           name, h->n, h->n ? h->min : 0, h->max, h->sum);
    int first = 1;
    for (int b = 0; b < NBUCKETS; b++) {
        if (!h->hist[b]) continue;
        printf("%s[%" PRIu64 ",%" PRIu64 "]", first ? "" : ",", hlow(b), h->hist[b]);
        first = 0;
    }
    printf("]}");
}

static void reset_window(void) {
    memset(&w, 0, sizeof w);
    w.cpu0 = cpu_seconds();
    w.wall0 = mono();
    for (int i = 0; i < opt_conns; i++) conns[i].win_count = 0;
}

static void note_close_code(int code) {
    for (int i = 0; i < NCODES; i++) {
        if (close_codes[i].n && close_codes[i].code == code) {
            close_codes[i].n++;
            return;
        }
        if (!close_codes[i].n) {
            close_codes[i].code = code;
            close_codes[i].n = 1;
            return;
        }
    }
}

static void report(const char *kind) {
    double cpu = cpu_seconds() - w.cpu0;
    double wall = mono() - w.wall0;
    uint32_t cmin = UINT32_MAX, cmax = 0;
    for (int i = 0; i < opt_conns; i++) {
        if (conns[i].state != ST_OPEN) continue;
        if (conns[i].win_count < cmin) cmin = conns[i].win_count;
        if (conns[i].win_count > cmax) cmax = conns[i].win_count;
    }
    if (cmin == UINT32_MAX) cmin = 0;
    printf("{\"kind\":\"%s\",\"label\":\"%s\",\"conns\":%d,\"open\":%d,\"failed\":%d,"
           "\"closed_by_server\":%d,\"connect_errors\":%" PRIu64 ",\"handshake_errors\":%" PRIu64
           ",\"close_codes\":{",
           kind, opt_label, opt_conns, nopen, nfailed, nclosed, connect_errors, handshake_errors);
    int first = 1;
    for (int i = 0; i < NCODES && close_codes[i].n; i++) {
        printf("%s\"%d\":%" PRIu64, first ? "" : ",", close_codes[i].code, close_codes[i].n);
        first = 0;
    }
    printf("},\"deliveries\":%" PRIu64 ",\"per_conn_min\":%u,\"per_conn_max\":%u,"
           "\"other_frames\":%" PRIu64 ",\"pings\":%" PRIu64 ",\"bytes\":%" PRIu64
           ",\"first_ns\":%" PRId64 ",\"last_ns\":%" PRId64 ",\"window_s\":%.6f,\"cpu_s\":%.6f,"
           "\"cpu_us_per_delivery\":%.4f,\"bad_t\":%" PRIu64 ",\"negative_latency\":%" PRIu64
           ",\"lat_us\":{\"n\":%" PRIu64 ",\"min\":%" PRIu64 ",\"max\":%" PRIu64
           ",\"sum\":%" PRIu64 ",\"hist\":[",
           w.deliveries, cmin, cmax, w.other_frames, w.pings, w.bytes, w.first_ns, w.last_ns, wall,
           cpu, w.deliveries ? cpu * 1e6 / (double)w.deliveries : 0.0, w.bad_t, w.negative,
           w.lat_n, w.lat_n ? w.lat_min : 0, w.lat_max, w.lat_sum);
    first = 1;
    for (int b = 0; b < NBUCKETS; b++) {
        if (!w.hist[b]) continue;
        printf("%s[%" PRIu64 ",%" PRIu64 "]", first ? "" : ",", hlow(b), w.hist[b]);
        first = 0;
    }
    printf("]}");
    if (opt_catchup) {
        printf(",\"catchup\":{\"messages\":%u,\"done\":%d,\"recovered\":%" PRIu64
               ",\"not_recovered\":%" PRIu64 ",\"disorder\":%" PRIu64 ",\"extra\":%" PRIu64
               ",\"bad_id\":%" PRIu64 ",\"wrong_ends\":%" PRIu64 ",\"wall_s\":%.6f,",
               opt_catchup, ndone, cu_recovered, cu_not_recovered, cu_disorder, cu_extra, cu_bad_id,
               cu_wrong_ends,
               cu_last_ns > cu_first_ns ? (double)(cu_last_ns - cu_first_ns) / 1e9 : 0.0);
        hist_print("subscribed_us", &cu_sub);
        printf(",");
        hist_print("done_us", &cu_done);
        printf("}");
    }
    printf("}\n");
    fflush(stdout);
}

/* ---- connections */

static void ep_set(conn_t *c, int idx, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u64 = (uint64_t)idx};
    if (c->want_out != out) {
        if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) perror("epoll_ctl mod");
        c->want_out = (uint8_t)out;
    }
}

static void free_bufs(conn_t *c) {
    free(c->rbuf);
    free(c->wbuf);
    free(c->frag);
    c->rbuf = c->wbuf = c->frag = NULL;
    c->rlen = c->rcap = c->wlen = c->wcap = c->flen = c->fcap = 0;
}

static void maybe_ready(void);

/* The connection is gone: before "subscribed" it is retried (bounded), after
 * it counts as closed by the server. */
static void drop(int idx, int server_closed) {
    conn_t *c = &conns[idx];
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    free_bufs(c);
    (void)server_closed;
    if (c->state == ST_CLOSING) { /* a catch-up finished: the slot is free */
        nopen--;
        ndone++;
        inflight--;
        c->state = ST_DONE;
        maybe_ready();
        return;
    }
    if (c->state == ST_OPEN) {
        nopen--;
        nclosed++;
        c->state = ST_CLOSED;
        if (opt_catchup) { /* closed before the catch-up was complete */
            inflight--;
            maybe_ready();
        }
        return;
    }
    if (c->state == ST_CLOSED || c->state == ST_IDLE || c->state == ST_DONE) return;
    inflight--;
    if (++c->retries <= opt_retries) {
        c->state = ST_IDLE;
        todo[ntodo++] = idx;
    } else {
        c->state = ST_CLOSED;
        nfailed++;
        progress_at = mono();
    }
    maybe_ready();
}

static int buf_append(uint8_t **buf, uint32_t *len, uint32_t *cap, const uint8_t *p, size_t n) {
    if (*len + n > *cap) {
        size_t ncap = *cap ? *cap : 512;
        while (ncap < *len + n) ncap *= 2;
        uint8_t *nb = realloc(*buf, ncap);
        if (!nb) return -1;
        *buf = nb;
        *cap = (uint32_t)ncap;
    }
    memcpy(*buf + *len, p, n);
    *len += (uint32_t)n;
    return 0;
}

/* Write now what can be written, keep the rest for EPOLLOUT. */
static int send_bytes(int idx, const uint8_t *p, size_t n) {
    conn_t *c = &conns[idx];
    if (c->wlen == 0) {
        ssize_t k = write(c->fd, p, n);
        if (k < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            k = 0;
        }
        p += k;
        n -= (size_t)k;
        if (n == 0) return 0;
    }
    if (buf_append(&c->wbuf, &c->wlen, &c->wcap, p, n) < 0) return -1;
    ep_set(c, idx, 1);
    return 0;
}

static int flush_out(int idx) {
    conn_t *c = &conns[idx];
    while (c->wlen) {
        ssize_t k = write(c->fd, c->wbuf, c->wlen);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        memmove(c->wbuf, c->wbuf + k, c->wlen - (size_t)k);
        c->wlen -= (uint32_t)k;
    }
    free(c->wbuf);
    c->wbuf = NULL;
    c->wcap = 0;
    ep_set(c, idx, 0);
    return 0;
}

/* A masked client frame (payload <= 125 bytes: control frames only). */
static int send_frame(int idx, int op, const uint8_t *payload, size_t n) {
    uint8_t f[2 + 4 + 125];
    if (n > 125) n = 125;
    uint32_t key = rnd32();
    uint8_t *mask = f + 2;
    f[0] = (uint8_t)(0x80 | op);
    f[1] = (uint8_t)(0x80 | n);
    memcpy(mask, &key, 4);
    for (size_t i = 0; i < n; i++) f[6 + i] = payload[i] ^ mask[i & 3];
    return send_bytes(idx, f, 6 + n);
}

static void start_connect(int idx) {
    conn_t *c = &conns[idx];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("socket");
        connect_errors++;
        c->state = ST_CONNECTING;
        inflight++;
        drop(idx, 0);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nsrcs) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        c->src = (uint16_t)(idx % nsrcs);
        if (bind(fd, (struct sockaddr *)&srcs[c->src], sizeof srcs[c->src]) < 0) {
            perror("bind");
        }
    }
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->want_out = 1;
    if (c->retries == 0) { /* a catch-up is timed from the first attempt */
        c->t0_ns = mono_ns();
        if (!cu_first_ns) cu_first_ns = c->t0_ns;
    }
    inflight++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        perror("epoll_ctl add");
        connect_errors++;
        drop(idx, 0);
        return;
    }
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        if (connect_errors < 5) perror("connect");
        connect_errors++;
        drop(idx, 0);
    }
}

static void maybe_ready(void) {
    if (nready_printed) return;
    if (opt_catchup) {
        if (ntodo == 0 && inflight == 0 && ndone + nfailed + nclosed >= opt_conns) {
            printf("done %d failed %d\n", ndone, nfailed + nclosed);
            fflush(stdout);
            nready_printed = 1;
            done = 1;
        }
        return;
    }
    if (ntodo == 0 && inflight == 0 && nopen + nfailed + nclosed >= opt_conns) {
        printf("ready %d failed %d\n", nopen, nfailed + nclosed);
        fflush(stdout);
        nready_printed = 1;
        ready_at = mono();
        reset_window();
    }
}

static void force_ready(const char *why) {
    if (nready_printed) return;
    fprintf(stderr, "wsclient%s%s: connect phase %s: %d subscribed, %d in flight, %d to go\n",
            *opt_label ? " " : "", opt_label, why, nopen, inflight, ntodo);
    if (opt_catchup) {
        printf("done %d failed %d\n", ndone, opt_conns - ndone);
        fflush(stdout);
        nready_printed = 1;
        done = 1;
        return;
    }
    printf("ready %d failed %d\n", nopen, opt_conns - nopen);
    fflush(stdout);
    nready_printed = 1;
    ready_at = mono();
    reset_window();
}

static void record_latency(const uint8_t *p, size_t n, int64_t now_ns) {
    /* data is {"t":<number>,...}; the envelope's own keys come first.
     * --raw: the frame is the data. */
    const uint8_t *d = opt_raw ? p : memmem(p, n, "\"data\":", 7);
    const uint8_t *t = d ? memmem(d, n - (size_t)(d - p), "\"t\":", 4) : NULL;
    if (!t) {
        w.bad_t++;
        return;
    }
    t += 4;
    const uint8_t *end = p + n;
    while (t < end && (*t == ' ')) t++;
    int64_t v = 0;
    int digits = 0;
    while (t < end && *t >= '0' && *t <= '9' && digits < 19) {
        v = v * 10 + (*t - '0');
        t++;
        digits++;
    }
    if (!digits) {
        w.bad_t++;
        return;
    }
    int64_t sent_ns;
    if (v > 100000000000000000LL) sent_ns = v;                 /* ns */
    else if (v > 100000000000000LL) sent_ns = v * 1000;        /* us */
    else sent_ns = v * 1000000;                                /* ms */
    int64_t lat = (now_ns - sent_ns) / 1000;
    if (lat < 0) {
        w.negative++;
        lat = 0;
    }
    uint64_t u = (uint64_t)lat;
    if (!w.lat_n || u < w.lat_min) w.lat_min = u;
    if (u > w.lat_max) w.lat_max = u;
    w.lat_sum += u;
    w.lat_n++;
    w.hist[hbucket(u)]++;
}

static int err_frames_shown;

/* --catchup: check the id order, and once N messages came, time it and close. */
static void catchup_message(int idx, const uint8_t *p, size_t n) {
    conn_t *c = &conns[idx];
    const uint8_t *q = memmem(p, n, "\"id\":\"", 6);
    uint64_t ms = 0, seq = 0;
    int ok = q != NULL;
    if (ok) {
        const uint8_t *end = p + n;
        int dm = 0, ds = 0;
        for (q += 6; q < end && *q >= '0' && *q <= '9' && dm < 20; q++, dm++)
            ms = ms * 10 + (uint64_t)(*q - '0');
        if (q < end && *q == '-')
            for (q++; q < end && *q >= '0' && *q <= '9' && ds < 10; q++, ds++)
                seq = seq * 10 + (uint64_t)(*q - '0');
        ok = dm && ds && q < end && *q == '"';
    }
    if (!ok) {
        cu_bad_id++;
    } else {
        if (c->cu_count && (ms < c->last_ms || (ms == c->last_ms && seq <= c->last_seq)))
            cu_disorder++;
        if (opt_ids && c->cu_count == 0 && (ms != ids_first_ms || seq != ids_first_seq))
            cu_wrong_ends++;
        if (opt_ids && c->cu_count + 1 == opt_catchup && (ms != ids_last_ms || seq != ids_last_seq))
            cu_wrong_ends++;
        c->last_ms = ms;
        c->last_seq = (uint32_t)seq;
    }
    if (++c->cu_count < opt_catchup) return;
    int64_t t = mono_ns();
    hist_add(&cu_done, (uint64_t)(t - c->t0_ns) / 1000);
    if (t > cu_last_ns) cu_last_ns = t;
    static const uint8_t normal[2] = {0x03, 0xE8}; /* 1000 */
    c->state = ST_CLOSING; /* the server answers the close and ends the connection */
    if (send_frame(idx, 0x8, normal, 2) < 0) drop(idx, 0);
}

static void on_message(int idx, const uint8_t *p, size_t n, int64_t now_ns) {
    conn_t *c = &conns[idx];
    if (c->state == ST_OPEN || c->state == ST_CLOSING) {
        if (opt_raw || (n >= 17 && memcmp(p, "{\"type\":\"message\"", 17) == 0)) {
            w.deliveries++;
            total_deliveries++;
            c->win_count++;
            w.bytes += n;
            if (!w.first_ns) w.first_ns = now_ns;
            w.last_ns = now_ns;
            if (c->state == ST_CLOSING) cu_extra++;
            else if (opt_catchup) catchup_message(idx, p, n);
            else if (!opt_idle) record_latency(p, n, now_ns);
        } else {
            w.other_frames++;
        }
        return;
    }
    if (c->state == ST_WAIT_SUB) {
        if (memmem(p, n, "\"type\":\"subscribed\"", 19)) {
            c->state = ST_OPEN;
            nopen++;
            progress_at = mono();
            if (opt_catchup) {
                hist_add(&cu_sub, (uint64_t)(mono_ns() - c->t0_ns) / 1000);
                if (memmem(p, n, "\"recovered\":true", 16)) cu_recovered++;
                else cu_not_recovered++;
                return; /* the slot stays taken until the catch-up is done */
            }
            inflight--;
            maybe_ready();
        } else if (err_frames_shown++ < 5) {
            fprintf(stderr, "wsclient: frame before subscribed: %.*s\n", (int)(n > 300 ? 300 : n),
                    (const char *)p);
        }
    }
}

/* Parse frames from p[0..n); returns bytes consumed or -1 when the connection
 * was dropped. */
static long parse_frames(int idx, uint8_t *p, size_t n, int64_t now_ns) {
    conn_t *c = &conns[idx];
    size_t off = 0;
    while (n - off >= 2) {
        uint8_t *f = p + off;
        size_t avail = n - off;
        int fin = f[0] & 0x80, op = f[0] & 0x0f, masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7f;
        size_t hdr = 2;
        if (plen == 126) {
            if (avail < 4) break;
            plen = ((uint64_t)f[2] << 8) | f[3];
            hdr = 4;
        } else if (plen == 127) {
            if (avail < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = (plen << 8) | f[2 + i];
            hdr = 10;
        }
        if (masked) hdr += 4;
        if (plen > MAX_FRAME) {
            fprintf(stderr, "wsclient: frame of %" PRIu64 " bytes, dropping connection\n", plen);
            drop(idx, 0);
            return -1;
        }
        if (avail < hdr + plen) break;
        uint8_t *pl = f + hdr;
        if (masked) {
            uint8_t *mk = f + hdr - 4;
            for (uint64_t i = 0; i < plen; i++) pl[i] ^= mk[i & 3];
        }
        off += hdr + (size_t)plen;
        switch (op) {
        case 0x9: /* ping */
            w.pings++;
            if (send_frame(idx, 0xA, pl, (size_t)plen) < 0) {
                drop(idx, 0);
                return -1;
            }
            break;
        case 0xA: /* pong */
            break;
        case 0x8: { /* close */
            int code = plen >= 2 ? (pl[0] << 8) | pl[1] : 1005;
            if (c->state == ST_CLOSING) { /* the answer to our close */
                drop(idx, 1);
                return -1;
            }
            note_close_code(code);
            uint8_t echo[2] = {(uint8_t)(code >> 8), (uint8_t)code};
            send_frame(idx, 0x8, echo, code == 1005 ? 0 : 2);
            if (c->state != ST_OPEN) handshake_errors++;
            drop(idx, 1);
            return -1;
        }
        case 0x1:
        case 0x2:
            if (fin) {
                on_message(idx, pl, (size_t)plen, now_ns);
            } else {
                c->flen = 0;
                c->frag_op = (uint8_t)op;
                buf_append(&c->frag, &c->flen, &c->fcap, pl, (size_t)plen);
            }
            break;
        case 0x0:
            buf_append(&c->frag, &c->flen, &c->fcap, pl, (size_t)plen);
            if (fin) {
                on_message(idx, c->frag, c->flen, now_ns);
                free(c->frag);
                c->frag = NULL;
                c->flen = c->fcap = 0;
            }
            break;
        default:
            fprintf(stderr, "wsclient: unknown opcode %d\n", op);
            drop(idx, 0);
            return -1;
        }
        if (c->fd < 0) return -1;
    }
    return (long)off;
}

static int ascii_casefind(const uint8_t *h, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp((const char *)h + i, needle, k) == 0) return (int)i;
    return -1;
}

/* Returns bytes consumed, or -1 when the connection was dropped. */
static long process(int idx, uint8_t *p, size_t n, int64_t now_ns) {
    conn_t *c = &conns[idx];
    size_t off = 0;
    if (c->state == ST_HANDSHAKE) {
        uint8_t *e = memmem(p, n, "\r\n\r\n", 4);
        if (!e) {
            if (n > MAX_HEADER) {
                handshake_errors++;
                drop(idx, 0);
                return -1;
            }
            return 0;
        }
        size_t hlen = (size_t)(e - p) + 4;
        int a = ascii_casefind(p, hlen, "\r\nsec-websocket-accept:");
        int ok = hlen > 12 && memcmp(p, "HTTP/1.1 101", 12) == 0 && a >= 0;
        if (ok) {
            const uint8_t *v = p + a + 23, *hend = p + hlen;
            while (v < hend && (*v == ' ' || *v == '\t')) v++;
            ok = (size_t)(hend - v) >= strlen(WS_ACCEPT) &&
                 memcmp(v, WS_ACCEPT, strlen(WS_ACCEPT)) == 0;
        }
        if (!ok) {
            if (handshake_errors++ < 5)
                fprintf(stderr, "wsclient: bad handshake answer: %.*s\n",
                        (int)(hlen > 200 ? 200 : hlen), (const char *)p);
            drop(idx, 0);
            return -1;
        }
        c->state = ST_WAIT_SUB;
        off = hlen;
        if (opt_raw) { /* no subscribed frame: open once upgraded */
            c->state = ST_OPEN;
            nopen++;
            progress_at = mono();
            inflight--;
            maybe_ready();
        }
    }
    long k = parse_frames(idx, p + off, n - off, now_ns);
    if (k < 0) return -1;
    return (long)off + k;
}

static void on_readable(int idx) {
    conn_t *c = &conns[idx];
    ssize_t k = read(c->fd, rbuf_global, RBUF_SIZE);
    if (k <= 0) {
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        if (c->state == ST_HANDSHAKE || c->state == ST_WAIT_SUB) handshake_errors++;
        drop(idx, 1);
        return;
    }
    int64_t now_ns = realtime_ns();
    uint64_t before = w.deliveries;
    uint8_t *p = rbuf_global;
    size_t n = (size_t)k;
    int from_conn = 0;
    if (c->rlen) {
        if (buf_append(&c->rbuf, &c->rlen, &c->rcap, p, n) < 0) {
            drop(idx, 0);
            return;
        }
        p = c->rbuf;
        n = c->rlen;
        from_conn = 1;
    }
    long used = process(idx, p, n, now_ns);
    if (w.deliveries != before) last_delivery_mono = mono();
    if (used < 0) return; /* dropped */
    size_t left = n - (size_t)used;
    if (from_conn) {
        if (left && used) memmove(c->rbuf, c->rbuf + used, left);
        c->rlen = (uint32_t)left;
    } else if (left) {
        c->rlen = 0;
        buf_append(&c->rbuf, &c->rlen, &c->rcap, p + used, left);
    }
    if (c->rlen == 0 && c->rbuf) {
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
}

static void on_writable(int idx) {
    conn_t *c = &conns[idx];
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            if (connect_errors < 5) fprintf(stderr, "wsclient: connect: %s\n", strerror(err));
            connect_errors++;
            drop(idx, 0);
            return;
        }
        c->state = ST_HANDSHAKE;
        c->want_out = 1;
        ep_set(c, idx, 0);
        if (send_bytes(idx, (const uint8_t *)hs_request, (size_t)hs_len) < 0) drop(idx, 0);
        return;
    }
    if (flush_out(idx) < 0) drop(idx, 0);
}

/* ---- control */

static void command(char *line) {
    char *nl = strchr(line, '\n');
    if (nl) *nl = 0;
    if (strcmp(line, "stats") == 0) {
        report("report");
        reset_window();
    } else if (strncmp(line, "expect ", 7) == 0) {
        unsigned long long n = 0;
        double idle_ms = 0, max_ms = 0;
        if (sscanf(line + 7, "%llu %lf %lf", &n, &idle_ms, &max_ms) != 3) {
            fprintf(stderr, "wsclient: usage: expect N IDLE_MS MAX_MS\n");
            return;
        }
        expect_armed = 1;
        expect_n = n;
        expect_idle = idle_ms / 1e3;
        expect_max = max_ms / 1e3;
        expect_t0 = mono();
        reset_window();
        printf("armed\n");
        fflush(stdout);
    } else if (strcmp(line, "quit") == 0) {
        done = 1;
    } else if (*line) {
        fprintf(stderr, "wsclient: unknown command %s\n", line);
    }
}

static char cmdbuf[4096];
static size_t cmdlen;

static void on_stdin(void) {
    ssize_t k = read(0, cmdbuf + cmdlen, sizeof cmdbuf - 1 - cmdlen);
    if (k <= 0) {
        if (k < 0 && errno == EAGAIN) return;
        done = 1; /* EOF: the driver is gone */
        return;
    }
    cmdlen += (size_t)k;
    cmdbuf[cmdlen] = 0;
    char *start = cmdbuf, *nl;
    while ((nl = strchr(start, '\n'))) {
        *nl = 0;
        command(start);
        start = nl + 1;
    }
    cmdlen = strlen(start);
    memmove(cmdbuf, start, cmdlen);
    if (cmdlen == sizeof cmdbuf - 1) cmdlen = 0;
}

static void check_expect(double now) {
    if (!expect_armed) return;
    int hit = w.deliveries >= expect_n;
    if (!hit && w.deliveries && last_delivery_mono > expect_t0 && now - last_delivery_mono > expect_idle)
        hit = 1;
    if (!hit && now - expect_t0 > expect_max) hit = 1;
    if (hit) {
        expect_armed = 0;
        report("expect");
        reset_window();
    }
}

static int parse_sources(const char *spec) {
    char *s = strdup(spec), *save = NULL;
    int cap = 16;
    srcs = calloc((size_t)cap, sizeof *srcs);
    for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *dash = strchr(tok, '-');
        struct in_addr a, b;
        if (dash) *dash = 0;
        if (inet_pton(AF_INET, tok, &a) != 1 || (dash && inet_pton(AF_INET, dash + 1, &b) != 1)) {
            fprintf(stderr, "wsclient: bad source address %s\n", tok);
            return -1;
        }
        uint32_t lo = ntohl(a.s_addr), hi = dash ? ntohl(b.s_addr) : lo;
        for (uint32_t x = lo; x <= hi && x - lo < 65536; x++) {
            if (nsrcs == cap) {
                cap *= 2;
                srcs = realloc(srcs, (size_t)cap * sizeof *srcs);
            }
            memset(&srcs[nsrcs], 0, sizeof srcs[nsrcs]);
            srcs[nsrcs].sin_family = AF_INET;
            srcs[nsrcs].sin_addr.s_addr = htonl(x);
            nsrcs++;
        }
    }
    free(s);
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: wsclient [options]\n"
            "  --host A            server IPv4 address [127.0.0.1]\n"
            "  --port N            server port [8080]\n"
            "  --path P            request path [/ws?channel=bench]\n"
            "  --conns N           connections [1]\n"
            "  --src LIST          source addresses: a,b or a-b ranges [kernel's choice]\n"
            "  --rate R            connects per second, 0 unlimited [2000]\n"
            "  --inflight N        max connections between connect and subscribed [256]\n"
            "  --retries N         retries of a connection that failed before subscribed [3]\n"
            "  --connect-timeout S print ready anyway after S seconds [300]\n"
            "  --duration S        final report S seconds after ready [none]\n"
            "  --expect N          final report after N deliveries in total [none]\n"
            "  --idle              only hold the connections (messages not parsed)\n"
            "  --control           read commands on stdin (stats, expect N IDLE_MS MAX_MS, quit)\n"
            "  --label TEXT        put TEXT in the reports\n"
            "  --catchup N         recovery mode: time connect -> N-th message per connection,\n"
            "                      then close it; --inflight clients at a time\n"
            "  --ids FIRST,LAST    with --catchup: the ids the first and N-th message must have\n"
            "  --raw               no pushd frames (Nchan): open at 101, every frame a delivery\n"
            "  --stall S           print ready after S seconds in which no connection got\n"
            "                      subscribed or failed, with those open so far [off]\n");
}

int main(int argc, char **argv) {
    static struct option longopts[] = {
        {"host", 1, 0, 'H'},     {"port", 1, 0, 'p'},     {"path", 1, 0, 'u'},
        {"conns", 1, 0, 'n'},    {"src", 1, 0, 's'},      {"rate", 1, 0, 'r'},
        {"inflight", 1, 0, 'f'}, {"retries", 1, 0, 'R'},  {"connect-timeout", 1, 0, 'T'},
        {"duration", 1, 0, 'd'}, {"expect", 1, 0, 'e'},   {"idle", 0, 0, 'i'},
        {"control", 0, 0, 'C'},  {"label", 1, 0, 'l'},    {"help", 0, 0, 'h'},
        {"catchup", 1, 0, 'N'},  {"raw", 0, 0, 'W'},      {"stall", 1, 0, 'S'},
        {"ids", 1, 0, 'I'},      {0, 0, 0, 0}};
    int ch;
    const char *src_spec = NULL;
    while ((ch = getopt_long(argc, argv, "H:p:u:n:s:r:f:R:T:d:e:iCl:hN:WS:I:", longopts, NULL)) != -1) {
        switch (ch) {
        case 'H': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 'u': opt_path = optarg; break;
        case 'n': opt_conns = atoi(optarg); break;
        case 's': src_spec = optarg; break;
        case 'r': opt_rate = atof(optarg); break;
        case 'f': opt_inflight = atoi(optarg); break;
        case 'R': opt_retries = atoi(optarg); break;
        case 'T': opt_connect_timeout = atof(optarg); break;
        case 'd': opt_duration = atof(optarg); break;
        case 'e': opt_expect = strtoull(optarg, NULL, 10); break;
        case 'i': opt_idle = 1; break;
        case 'C': opt_control = 1; break;
        case 'l': opt_label = optarg; break;
        case 'N': opt_catchup = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'W': opt_raw = 1; break;
        case 'S': opt_stall = atof(optarg); break;
        case 'I':
            if (sscanf(optarg, "%" SCNu64 "-%" SCNu64 ",%" SCNu64 "-%" SCNu64, &ids_first_ms,
                       &ids_first_seq, &ids_last_ms, &ids_last_seq) != 4) {
                fprintf(stderr, "wsclient: --ids wants FIRST,LAST (ms-seq ids)\n");
                return 2;
            }
            opt_ids = 1;
            break;
        default: usage(); return ch == 'h' ? 0 : 2;
        }
    }
    if (opt_conns < 1 || opt_inflight < 1 || opt_port < 1 || opt_port > 65535) {
        usage();
        return 2;
    }
    if (opt_raw && opt_catchup) {
        fprintf(stderr, "wsclient: --raw and --catchup do not go together\n");
        return 2;
    }
    if (src_spec && parse_sources(src_spec) < 0) return 2;
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &server.sin_addr) != 1) {
        fprintf(stderr, "wsclient: --host must be an IPv4 address\n");
        return 2;
    }

    /* Use every fd the hard limit allows. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && (rlim_t)opt_conns + 16 > rl.rlim_cur) {
        fprintf(stderr, "wsclient: %d connections need more than the fd limit %lu\n", opt_conns,
                (unsigned long)rl.rlim_cur);
        return 2;
    }

    hs_len = snprintf(hs_request, sizeof hs_request,
                      "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n",
                      opt_path, opt_host, opt_port);
    rng ^= (uint64_t)getpid() << 32 ^ (uint64_t)realtime_ns();

    conns = calloc((size_t)opt_conns, sizeof *conns);
    todo = calloc((size_t)opt_conns, sizeof *todo);
    for (int i = 0; i < opt_conns; i++) {
        conns[i].fd = -1;
        todo[i] = opt_conns - 1 - i; /* a stack: connection 0 goes first */
    }
    ntodo = opt_conns;

    ep = epoll_create1(EPOLL_CLOEXEC);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGPIPE);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_SIGNAL};
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    if (opt_control) {
        fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
        ev.data.u64 = TAG_STDIN;
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }

    reset_window();
    double t_start = mono(), tokens = 0, t_tok = t_start;
    progress_at = t_start;
    struct epoll_event events[1024];
    while (!done) {
        double now = mono();
        /* connect phase, rate-limited */
        if (ntodo) {
            if (opt_rate > 0) {
                tokens += (now - t_tok) * opt_rate;
                double burst = opt_rate / 50 > 1 ? opt_rate / 50 : 1;
                if (tokens > burst) tokens = burst;
            } else {
                tokens = 1e9;
            }
            t_tok = now;
            while (ntodo && tokens >= 1 && inflight < opt_inflight) {
                tokens -= 1;
                start_connect(todo[--ntodo]);
            }
        }
        if (!nready_printed && now - t_start > opt_connect_timeout) force_ready("timed out");
        if (!nready_printed && opt_stall > 0 && now - progress_at > opt_stall)
            force_ready("stalled (--stall)");
        if (nready_printed && opt_duration > 0 && now - ready_at >= opt_duration) break;
        check_expect(now);
        if (!expect_armed && opt_expect && total_deliveries >= opt_expect) break;

        int timeout = ntodo ? 5 : (expect_armed || opt_duration > 0 ? 20 : 200);
        int k = epoll_wait(ep, events, 1024, timeout);
        if (k < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < k; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag == TAG_SIGNAL) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == sizeof si) {
                    if (si.ssi_signo == SIGUSR1) {
                        report("report");
                        reset_window();
                    } else if (si.ssi_signo != SIGPIPE) {
                        done = 1;
                    }
                }
                continue;
            }
            if (tag == TAG_STDIN) {
                on_stdin();
                continue;
            }
            int idx = (int)tag;
            conn_t *c = &conns[idx];
            if (c->fd < 0) continue; /* dropped earlier in this batch */
            uint32_t e = events[i].events;
            if (e & EPOLLOUT) {
                on_writable(idx);
                if (c->fd < 0) continue;
            }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (c->state == ST_CONNECTING) {
                    on_writable(idx); /* reports the connect error */
                    continue;
                }
                on_readable(idx);
            }
        }
        if (expect_armed || opt_expect) check_expect(mono());
    }
    report("final");
    return 0;
}
