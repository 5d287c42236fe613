/*
 * loadgen: a single-threaded epoll load generator for line-echo servers.
 *
 * Strategy. One thread, one epoll set, level-triggered, every socket non-blocking.
 * A connection (or a UDP "slot") is a small state machine driven by readiness
 * events and by deadlines checked after each epoll_wait(). Latencies go into a
 * fixed histogram: 1 us buckets up to 1 s, then 1 ms buckets up to 121 s, so
 * percentiles are exact to the microsecond where it matters (sub-second) and still
 * place the seconds-long outliers of SYN retransmission (1 s, 3 s, 7 s ...).
 *
 * Modes (all end by themselves, after --warmup + --duration at most, or the
 * bounds described for hold):
 *   pingpong  --conns N connections opened all at once; each sends one line and
 *             waits for the whole echo before sending the next.
 *   churn     --conns C slots; each opens a connection, sends one line, reads the
 *             echo, closes, and starts over.
 *   udp       --conns C slots, one UDP socket each; one datagram out, wait for its
 *             echo or --timeout (counted as lost), repeat.
 *   hold      open --conns N connections (at most --inflight unanswered at a time),
 *             one line each, wait for every echo, keep them all open until a line
 *             (or EOF) on stdin or --hold-seconds, then close them.
 *
 * Output: one JSON object on stdout. Progress for the driver ("HOLDING ...") goes to
 * stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- options */

enum mode { MODE_PINGPONG, MODE_CHURN, MODE_UDP, MODE_HOLD };

static const char *const mode_names[] = {"pingpong", "churn", "udp", "hold"};

struct options {
    const char *host;
    int port;
    enum mode mode;
    int conns;
    double duration;     /* measured window; for hold, the longest ramp-up */
    double warmup;       /* not measured; ignored by hold */
    int size;            /* bytes per request, the last one is '\n' */
    double timeout;      /* churn: per connection; udp: per datagram; hold: stall */
    double hold_seconds; /* hold: upper bound on the holding phase */
    int inflight;        /* hold: connections opened but not yet answered */
    double rate;         /* pingpong: total requests/s offered (open loop); 0 = closed loop */
};

/* 16 KiB per request is plenty for an echo benchmark and stays far below asyncio's
 * default StreamReader limit (64 KiB per line) and the UDP payload limit (65,507). */
#define MAX_SIZE 16384

/* ---------------------------------------------------------------- clock */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t sec_to_ns(double s)
{
    return s <= 0 ? 0 : (uint64_t)(s * 1e9);
}

/* ---------------------------------------------------------------- histogram */

#define H_US_BUCKETS 1000000u /* 1 us each: 0 .. 1 s */
#define H_MS_BUCKETS 120000u  /* 1 ms each: 1 s .. 121 s */

static uint64_t hist_us[H_US_BUCKETS];
static uint64_t hist_ms[H_MS_BUCKETS];
static uint64_t hist_over; /* beyond 121 s: nothing in this program waits that long */
static uint64_t hist_count;
static uint64_t hist_max_us;
static double hist_sum_us;

static void hist_add(uint64_t ns)
{
    uint64_t us = ns / 1000u;
    if (us < H_US_BUCKETS)
        hist_us[us]++;
    else if ((us - H_US_BUCKETS) / 1000u < H_MS_BUCKETS)
        hist_ms[(us - H_US_BUCKETS) / 1000u]++;
    else
        hist_over++;
    hist_count++;
    hist_sum_us += (double)us;
    if (us > hist_max_us)
        hist_max_us = us;
}

/* The smallest recorded value v (in us) with at least q of all samples <= v. Values
 * in the millisecond range report the upper edge of their bucket. */
static uint64_t hist_quantile(double q)
{
    if (hist_count == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)hist_count);
    if ((double)rank < q * (double)hist_count)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (uint32_t i = 0; i < H_US_BUCKETS; i++) {
        seen += hist_us[i];
        if (seen >= rank)
            return i;
    }
    for (uint32_t i = 0; i < H_MS_BUCKETS; i++) {
        seen += hist_ms[i];
        if (seen >= rank) {
            uint64_t v = H_US_BUCKETS + (uint64_t)(i + 1) * 1000u;
            return v < hist_max_us ? v : hist_max_us;
        }
    }
    return hist_max_us;
}

/* ---------------------------------------------------------------- errors */

struct errors {
    uint64_t refused;  /* ECONNREFUSED: nobody listening */
    uint64_t reset;    /* ECONNRESET / EPIPE */
    uint64_t eof;      /* the server closed before echoing the whole line */
    uint64_t timeout;  /* churn/udp/hold: --timeout elapsed */
    uint64_t bad_echo; /* the echo differs from what was sent */
    uint64_t no_ports; /* EADDRNOTAVAIL: out of ephemeral ports */
    uint64_t other;
};

static struct errors errs;

static void count_errno(int e)
{
    switch (e) {
    case ECONNREFUSED:
        errs.refused++;
        break;
    case ECONNRESET:
    case EPIPE:
        errs.reset++;
        break;
    case ETIMEDOUT:
        errs.timeout++;
        break;
    case EADDRNOTAVAIL:
        errs.no_ports++;
        break;
    default:
        errs.other++;
        break;
    }
}

static uint64_t errors_total(void)
{
    return errs.refused + errs.reset + errs.eof + errs.timeout + errs.bad_echo +
           errs.no_ports + errs.other;
}

/* ---------------------------------------------------------------- connections */

enum cstate {
    C_IDLE,       /* no socket; (re)open at retry_at */
    C_CONNECTING, /* non-blocking connect in progress */
    C_WAITING,    /* request (partly) sent, echo not complete */
    C_HELD,       /* hold mode: answered, kept open */
    C_READY,      /* pingpong --rate: connected, next request not yet due */
};

struct conn {
    int fd;
    enum cstate state;
    size_t sent;
    size_t rcvd;
    uint64_t t_open;       /* this connection (churn: this attempt) started */
    uint64_t t_req;        /* current request started */
    uint64_t retry_at;     /* C_IDLE: when to open again */
    uint64_t first_resp;   /* ns from the start of the run to the first echo; 0 = none */
    uint64_t done_window;  /* echoes completed inside the measured window */
    uint64_t seq;          /* udp: sequence number of the datagram in flight */
    uint64_t next_due;     /* pingpong --rate: intended send time of the next request */
    bool counted_unanswer; /* hold: already given up on */
};

static struct options opt;
static struct sockaddr_in server_addr;
static int epfd;
static struct conn *conns;
static unsigned char *line;   /* the request line (TCP) */
static unsigned char *rxbuf;  /* scratch for reads */
static uint64_t t_start;      /* the run began (connections opened) */
static uint64_t t_measure;    /* the measured window begins */
static uint64_t t_end;        /* the measured window ends */
static uint64_t completed;    /* echoes completed inside the window */
static uint64_t late_replies; /* udp: replies to datagrams already given up on */
static uint64_t opened;       /* connections opened (churn: attempts) */

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void raise_nofile(int wanted)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        die("getrlimit");
    rlim_t need = (rlim_t)wanted;
    if (rl.rlim_cur >= need)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need ? need : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        die("setrlimit");
    if (rl.rlim_cur < need)
        fprintf(stderr, "loadgen: RLIMIT_NOFILE hard limit %llu < %llu wanted\n",
                (unsigned long long)rl.rlim_max, (unsigned long long)need);
}

static void ep_set(struct conn *c, int op, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, op, c->fd, &ev) != 0)
        die("epoll_ctl");
}

static void close_conn(struct conn *c, bool abortive)
{
    if (c->fd < 0)
        return;
    if (abortive) {
        /* SO_LINGER {1, 0}: close() sends RST and frees the port at once instead of
         * leaving it in TIME_WAIT for 60 s (Linux's fixed TCP_TIMEWAIT_LEN). Churn at
         * 10,000+ connections/s would otherwise use up the 28,232 ephemeral ports of
         * the default ip_local_port_range (32768-60999) within about three seconds.
         * The server sees ECONNRESET instead of EOF on its next read; the benchmark
         * handlers treat both as the end of the connection. */
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd); /* also removes it from the epoll set */
    c->fd = -1;
}

static void fail_conn(struct conn *c, uint64_t now)
{
    /* Pingpong and churn reopen a failed connection; a short pause keeps a slot from
     * spinning at full speed against a server that refuses everything. */
    close_conn(c, true);
    c->state = C_IDLE;
    c->retry_at = now + 10 * 1000000u; /* 10 ms */
}

static void send_request(struct conn *c, uint64_t now);
static void dispatch(struct conn *c, uint64_t now);

/* Open loop (--rate). A closed-loop client sends its next request only after the
 * previous answer, so a server that stalls a connection also stops that connection
 * from asking: the stall hides itself ("coordinated omission", Gil Tene). With --rate
 * every connection has a schedule of intended send times, and a request's latency is
 * measured from its intended time, not from when it could finally be sent; requests
 * whose intended time fell in the window but which never completed (a connection
 * stuck in SYN retransmission, say) are counted at the end as at least
 * (end - intended). This is how wrk2 measures. */
static uint64_t interval_ns; /* per connection, = conns / rate */
static uint64_t censored;    /* intended requests in the window that never completed */

/* Start a non-blocking connect; the socket reports writable when it completes. */
static void open_tcp(struct conn *c, uint64_t now)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_errno(errno);
        c->state = C_IDLE;
        c->retry_at = now + 10 * 1000000u;
        return;
    }
    int one = 1;
    /* One small write per request; never let Nagle hold it back. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->sent = c->rcvd = 0;
    c->t_open = now;
    opened++;
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) == 0) {
        ep_set(c, EPOLL_CTL_ADD, EPOLLIN);
        dispatch(c, now);
        return;
    }
    if (errno != EINPROGRESS) {
        count_errno(errno);
        fail_conn(c, now);
        return;
    }
    c->state = C_CONNECTING;
    ep_set(c, EPOLL_CTL_ADD, EPOLLOUT);
}

static void open_udp(struct conn *c, uint64_t now)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(udp)");
    /* connect() filters out datagrams from anyone but the server and turns an ICMP
     * port-unreachable into ECONNREFUSED on the next recv. */
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) != 0)
        die("connect(udp)");
    c->fd = fd;
    opened++;
    ep_set(c, EPOLL_CTL_ADD, EPOLLIN);
    send_request(c, now);
}

/* UDP datagrams carry their slot's sequence number in the first 16 bytes (hex) so
 * that the echo of a datagram already counted as lost is not taken for the current
 * one. */
static void stamp_seq(uint64_t seq)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = (size_t)opt.size - 1 < 16 ? (size_t)opt.size - 1 : 16;
    for (size_t i = 0; i < n; i++)
        line[i] = (unsigned char)hex[(seq >> (4 * (15 - i))) & 15u];
}

static void send_request(struct conn *c, uint64_t now)
{
    c->t_req = now;
    c->sent = c->rcvd = 0;
    c->state = C_WAITING;
    if (opt.mode == MODE_UDP) {
        c->seq++;
        stamp_seq(c->seq);
        if (send(c->fd, line, (size_t)opt.size, 0) < 0 && errno != EAGAIN)
            count_errno(errno); /* the timeout will count it as lost too */
        return;
    }
    ssize_t n = send(c->fd, line, (size_t)opt.size, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno != EAGAIN) {
            count_errno(errno);
            fail_conn(c, now);
            return;
        }
        n = 0;
    }
    c->sent = (size_t)n;
    if (c->sent < (size_t)opt.size)
        ep_set(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
}

/* Send now (closed loop), or when the schedule says (open loop). */
static void dispatch(struct conn *c, uint64_t now)
{
    if (interval_ns == 0) {
        send_request(c, now);
        return;
    }
    if (now < c->next_due) {
        c->state = C_READY;
        return;
    }
    uint64_t due = c->next_due;
    c->next_due += interval_ns;
    send_request(c, now);
    c->t_req = due; /* latency counts from the intended time */
}

static void record_echo(struct conn *c, uint64_t now)
{
    if (c->first_resp == 0)
        c->first_resp = now - t_start;
    if (interval_ns != 0) {
        /* Open loop: the sample belongs to the window its intended time is in. */
        if (c->t_req >= t_measure && c->t_req < t_end) {
            completed++;
            c->done_window++;
            hist_add(now - c->t_req);
        }
        return;
    }
    if (now >= t_measure && now < t_end) {
        completed++;
        c->done_window++;
        /* Churn measures the whole connection: connect, request, echo. */
        hist_add(now - (opt.mode == MODE_CHURN ? c->t_open : c->t_req));
    }
}

static void on_tcp_event(struct conn *c, uint32_t events, uint64_t now)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            count_errno(err);
            fail_conn(c, now);
            return;
        }
        ep_set(c, EPOLL_CTL_MOD, EPOLLIN);
        dispatch(c, now);
        return;
    }
    if (c->state == C_HELD) {
        /* Nothing more is expected on a held connection: data, EOF or an error
         * means the server broke it. */
        ssize_t n = recv(c->fd, rxbuf, MAX_SIZE, 0);
        if (n == 0)
            errs.eof++;
        else if (n < 0 && errno != EAGAIN)
            count_errno(errno);
        else if (n > 0)
            errs.bad_echo++;
        if (n <= 0 && (n == 0 || errno != EAGAIN)) {
            close_conn(c, false);
            c->state = C_IDLE;
            c->retry_at = UINT64_MAX; /* never reopened */
        }
        return;
    }
    if (c->state == C_READY) {
        /* Nothing is owed between requests: EOF, data or an error is the server's. */
        ssize_t n = recv(c->fd, rxbuf, MAX_SIZE, 0);
        if (n < 0 && errno == EAGAIN)
            return;
        if (n == 0)
            errs.eof++;
        else if (n < 0)
            count_errno(errno);
        else
            errs.bad_echo++;
        fail_conn(c, now);
        return;
    }
    if (c->state != C_WAITING)
        return;
    if ((events & EPOLLOUT) && c->sent < (size_t)opt.size) {
        ssize_t n = send(c->fd, line + c->sent, (size_t)opt.size - c->sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) {
            count_errno(errno);
            fail_conn(c, now);
            return;
        }
        if (n > 0)
            c->sent += (size_t)n;
        if (c->sent == (size_t)opt.size)
            ep_set(c, EPOLL_CTL_MOD, EPOLLIN);
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        return;
    ssize_t n = recv(c->fd, rxbuf, (size_t)opt.size - c->rcvd, 0);
    if (n < 0) {
        if (errno == EAGAIN)
            return;
        count_errno(errno);
        fail_conn(c, now);
        return;
    }
    if (n == 0) {
        errs.eof++;
        fail_conn(c, now);
        return;
    }
    if (memcmp(rxbuf, line + c->rcvd, (size_t)n) != 0) {
        errs.bad_echo++;
        fail_conn(c, now);
        return;
    }
    c->rcvd += (size_t)n;
    if (c->rcvd < (size_t)opt.size)
        return;
    record_echo(c, now);
    switch (opt.mode) {
    case MODE_PINGPONG:
        dispatch(c, now);
        break;
    case MODE_CHURN:
        close_conn(c, true);
        open_tcp(c, now);
        break;
    case MODE_HOLD:
        c->state = C_HELD;
        break;
    case MODE_UDP:
        break;
    }
}

static void on_udp_event(struct conn *c, uint64_t now)
{
    for (;;) {
        ssize_t n = recv(c->fd, rxbuf, MAX_SIZE, 0);
        if (n < 0) {
            if (errno != EAGAIN)
                count_errno(errno);
            return;
        }
        if (c->state != C_WAITING) {
            late_replies++;
            continue;
        }
        stamp_seq(c->seq);
        if ((size_t)n != (size_t)opt.size || memcmp(rxbuf, line, (size_t)n) != 0) {
            /* Most likely the echo of an earlier datagram that timed out. */
            late_replies++;
            continue;
        }
        record_echo(c, now);
        send_request(c, now);
    }
}

/* Deadlines: reopen idle slots, time out churn connections and UDP datagrams. */
static void check_deadlines(uint64_t now)
{
    uint64_t tmo = sec_to_ns(opt.timeout);
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_READY && now >= c->next_due) {
            dispatch(c, now);
            continue;
        }
        if (c->state == C_IDLE && now >= c->retry_at) {
            if (opt.mode == MODE_UDP)
                send_request(c, now);
            else
                open_tcp(c, now);
            continue;
        }
        if (tmo == 0)
            continue;
        if (opt.mode == MODE_UDP && c->state == C_WAITING && now - c->t_req >= tmo) {
            errs.timeout++; /* reported as "lost" */
            send_request(c, now);
        } else if (opt.mode == MODE_CHURN &&
                   (c->state == C_CONNECTING || c->state == C_WAITING) &&
                   now - c->t_open >= tmo) {
            errs.timeout++;
            close_conn(c, true);
            open_tcp(c, now);
        }
    }
}

/* ---------------------------------------------------------------- output */

static void print_common(uint64_t window_ns)
{
    double secs = (double)window_ns / 1e9;
    printf("\"mode\": \"%s\", \"conns\": %d, \"size\": %d, \"duration_s\": %.3f, "
           "\"warmup_s\": %.3f, ",
           mode_names[opt.mode], opt.conns, opt.size, secs, opt.warmup);
    printf("\"completed\": %llu, \"rate\": %.1f, ", (unsigned long long)completed,
           secs > 0 ? (double)completed / secs : 0.0);
    printf("\"latency_us\": {\"mean\": %.1f, \"p50\": %llu, \"p90\": %llu, \"p99\": %llu, "
           "\"p999\": %llu, \"max\": %llu}, ",
           hist_count ? hist_sum_us / (double)hist_count : 0.0,
           (unsigned long long)hist_quantile(0.50), (unsigned long long)hist_quantile(0.90),
           (unsigned long long)hist_quantile(0.99), (unsigned long long)hist_quantile(0.999),
           (unsigned long long)hist_max_us);
    printf("\"errors\": %llu, \"error_kinds\": {\"refused\": %llu, \"reset\": %llu, "
           "\"eof\": %llu, \"timeout\": %llu, \"bad_echo\": %llu, \"no_ports\": %llu, "
           "\"other\": %llu}, \"opened\": %llu",
           (unsigned long long)errors_total(), (unsigned long long)errs.refused,
           (unsigned long long)errs.reset, (unsigned long long)errs.eof,
           (unsigned long long)errs.timeout, (unsigned long long)errs.bad_echo,
           (unsigned long long)errs.no_ports, (unsigned long long)errs.other,
           (unsigned long long)opened);
}

/* ---------------------------------------------------------------- run loops */

#define MAX_EVENTS 1024

static void poll_once(int timeout_ms, uint64_t *now)
{
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout_ms);
    if (n < 0 && errno != EINTR)
        die("epoll_wait");
    *now = now_ns();
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[evs[i].data.u32];
        if (c->fd < 0)
            continue;
        if (opt.mode == MODE_UDP)
            on_udp_event(c, *now);
        else
            on_tcp_event(c, evs[i].events, *now);
    }
}

/* pingpong, churn, udp: run until the end of the measured window. */
static void run_timed(void)
{
    uint64_t now = now_ns();
    t_start = now;
    t_measure = t_start + sec_to_ns(opt.warmup);
    t_end = t_measure + sec_to_ns(opt.duration);
    /* Open loop: stagger the connections' schedules evenly over one interval. */
    for (int i = 0; i < opt.conns; i++)
        conns[i].next_due = t_start + interval_ns * (uint64_t)i / (uint64_t)opt.conns;
    /* All connections at once: a server with a small listen backlog has to show what
     * it does with a burst, which is the point of the 128-connection scenario. */
    for (int i = 0; i < opt.conns; i++) {
        if (opt.mode == MODE_UDP)
            open_udp(&conns[i], now);
        else
            open_tcp(&conns[i], now);
    }
    while (now < t_end) {
        /* Wake at least every 5 ms for deadlines: timeouts are >= 0.1 s in practice,
         * so 5 ms is well under their resolution and costs nothing measurable. */
        uint64_t left_ms = (t_end - now) / 1000000u + 1;
        int timeout_ms = left_ms < 5 ? (int)left_ms : 5;
        if (interval_ns != 0) {
            /* Open loop: do not sleep past the next intended send (epoll_wait counts
             * whole milliseconds, so under 1 ms away means poll without sleeping; the
             * load generator has its own CPU). */
            for (int i = 0; i < opt.conns; i++) {
                if (conns[i].state == C_READY) {
                    uint64_t wait = conns[i].next_due > now ? conns[i].next_due - now : 0;
                    if ((int)(wait / 1000000u) < timeout_ms)
                        timeout_ms = (int)(wait / 1000000u);
                }
            }
        }
        poll_once(timeout_ms, &now);
        check_deadlines(now);
    }
    if (interval_ns != 0) {
        /* Intended requests in the window that never completed: each is a sample of
         * at least (end - intended). */
        for (int i = 0; i < opt.conns; i++) {
            struct conn *c = &conns[i];
            uint64_t due = c->next_due;
            if (c->state == C_WAITING && c->t_req >= t_measure && c->t_req < t_end) {
                hist_add(t_end - c->t_req);
                censored++;
            }
            if (due < t_measure)
                due += (t_measure - due + interval_ns - 1) / interval_ns * interval_ns;
            for (; due < t_end; due += interval_ns) {
                hist_add(t_end - due);
                censored++;
            }
        }
    }

    uint64_t unanswered = 0, never = 0, over_1s = 0, first_max = 0;
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (c->done_window == 0)
            unanswered++;
        if (c->first_resp == 0)
            never++;
        else {
            if (c->first_resp > first_max)
                first_max = c->first_resp;
            if (c->first_resp > 1000000000u)
                over_1s++;
        }
        /* Plain close(): a FIN, or an RST if an echo arrived unread (Linux resets
         * a socket closed with unread data); the handlers take either as the end.
         * Client-side TIME_WAIT for at most a few thousand sockets is harmless. */
        close_conn(c, opt.mode == MODE_CHURN);
    }
    printf("{");
    print_common(t_end - t_measure);
    if (opt.mode == MODE_UDP) {
        printf(", \"lost\": %llu, \"late_replies\": %llu", (unsigned long long)errs.timeout,
               (unsigned long long)late_replies);
    }
    /* Connections (slots) that completed nothing in the measured window. */
    printf(", \"unanswered\": %llu", (unsigned long long)unanswered);
    if (interval_ns != 0)
        printf(", \"offered_rate\": %.1f, \"censored\": %llu", opt.rate,
               (unsigned long long)censored);
    if (opt.mode == MODE_PINGPONG) {
        printf(", \"never_answered\": %llu, "
               "\"first_response_max_us\": %llu, \"first_response_over_1s\": %llu",
               (unsigned long long)never, (unsigned long long)(first_max / 1000u),
               (unsigned long long)over_1s);
    }
    printf("}\n");
}

/* hold: ramp up, hold, close. */
static void run_hold(void)
{
    uint64_t now = now_ns();
    t_start = t_measure = now;
    t_end = UINT64_MAX;
    uint64_t ramp_end = now + sec_to_ns(opt.duration);
    uint64_t stall = sec_to_ns(opt.timeout);
    uint64_t last_progress = now;
    int next = 0;
    uint64_t answered = 0;

    for (int i = 0; i < opt.conns; i++) {
        conns[i].state = C_IDLE;
        conns[i].retry_at = UINT64_MAX;
    }
    /* Ramp: keep at most --inflight connections unanswered. Opening all 5,000 at
     * once would measure SYN-retransmission backoff (1 s, 3 s, 7 s ...) against a
     * small backlog, not memory; pingpong-128 measures the burst instead. */
    while (now < ramp_end && (int)answered < opt.conns) {
        int pending = 0;
        for (int i = 0; i < next; i++)
            if (conns[i].state == C_CONNECTING || conns[i].state == C_WAITING)
                pending++;
        while (pending < opt.inflight && next < opt.conns) {
            open_tcp(&conns[next++], now);
            pending++;
        }
        poll_once(5, &now);
        uint64_t a = 0;
        for (int i = 0; i < next; i++)
            if (conns[i].state == C_HELD)
                a++;
        if (a > answered)
            last_progress = now;
        answered = a;
        /* A failed connection is not retried: holding measures what the server
         * keeps, and a retry would hide a refusal. Its slot stays C_IDLE. */
        if (stall && now - last_progress >= stall)
            break;
        int failed = 0;
        for (int i = 0; i < next; i++)
            if (conns[i].state == C_IDLE)
                failed++;
        if (next == opt.conns && failed + (int)answered == opt.conns)
            break;
    }
    uint64_t ramp_ns = now - t_start;
    fprintf(stderr, "HOLDING %llu %d\n", (unsigned long long)answered, opt.conns);
    fflush(stderr);

    /* Hold until the driver writes a line or closes stdin, or --hold-seconds. */
    uint64_t hold_end = now + sec_to_ns(opt.hold_seconds);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    /* epoll refuses regular files and /dev/null (EPERM); then only the clock ends
     * the hold, which is why --hold-seconds is always bounded. */
    (void)epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &ev);
    while (now < hold_end) {
        struct epoll_event evs[MAX_EVENTS];
        uint64_t left_ms = (hold_end - now) / 1000000u + 1;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, left_ms < 100 ? (int)left_ms : 100);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        now = now_ns();
        bool stop = false;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == UINT32_MAX) {
                stop = true;
                continue;
            }
            struct conn *c = &conns[evs[i].data.u32];
            if (c->fd >= 0)
                on_tcp_event(c, evs[i].events, now);
        }
        if (stop)
            break;
    }
    uint64_t still_open = 0;
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].state == C_HELD)
            still_open++;
        close_conn(&conns[i], false);
    }
    printf("{\"mode\": \"hold\", \"conns\": %d, \"size\": %d, \"answered\": %llu, "
           "\"unanswered\": %llu, \"held_at_end\": %llu, \"ramp_s\": %.3f, ",
           opt.conns, opt.size, (unsigned long long)answered,
           (unsigned long long)((uint64_t)opt.conns - answered),
           (unsigned long long)still_open, (double)ramp_ns / 1e9);
    printf("\"latency_us\": {\"p50\": %llu, \"p99\": %llu, \"max\": %llu}, ",
           (unsigned long long)hist_quantile(0.50), (unsigned long long)hist_quantile(0.99),
           (unsigned long long)hist_max_us);
    printf("\"errors\": %llu, \"error_kinds\": {\"refused\": %llu, \"reset\": %llu, "
           "\"eof\": %llu, \"bad_echo\": %llu, \"no_ports\": %llu, \"other\": %llu}}\n",
           (unsigned long long)errors_total(), (unsigned long long)errs.refused,
           (unsigned long long)errs.reset, (unsigned long long)errs.eof,
           (unsigned long long)errs.bad_echo, (unsigned long long)errs.no_ports,
           (unsigned long long)errs.other);
}

/* ---------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --port P [--host 127.0.0.1] [--mode pingpong|churn|udp|hold]\n"
            "               [--conns N] [--duration S] [--warmup S] [--size BYTES]\n"
            "               [--timeout S] [--hold-seconds S] [--inflight N]\n"
            "               [--rate REQUESTS_PER_S]  (pingpong: open loop)\n");
}

static double parse_double(const char *s, const char *name)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "loadgen: %s wants a non-negative number, got '%s'\n", name, s);
        exit(2);
    }
    return v;
}

static int parse_int(const char *s, const char *name, long lo, long hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "loadgen: %s wants an integer in [%ld, %ld], got '%s'\n", name, lo,
                hi, s);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char **argv)
{
    opt = (struct options){
        .host = "127.0.0.1",
        .port = 0,
        .mode = MODE_PINGPONG,
        .conns = 1,
        .duration = 5,
        .warmup = 1,
        .size = 64,
        .timeout = -1,
        .hold_seconds = 60,
        .inflight = 4,
        .rate = 0,
    };
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},     {"port", required_argument, 0, 'p'},
        {"mode", required_argument, 0, 'm'},     {"conns", required_argument, 0, 'c'},
        {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'w'},
        {"size", required_argument, 0, 's'},     {"timeout", required_argument, 0, 't'},
        {"hold-seconds", required_argument, 0, 'H'},
        {"inflight", required_argument, 0, 'i'}, {"rate", required_argument, 0, 'r'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h':
            opt.host = optarg;
            break;
        case 'p':
            opt.port = parse_int(optarg, "--port", 1, 65535);
            break;
        case 'm': {
            bool found = false;
            for (int i = 0; i < 4; i++) {
                if (strcmp(optarg, mode_names[i]) == 0) {
                    opt.mode = (enum mode)i;
                    found = true;
                }
            }
            if (!found) {
                fprintf(stderr, "loadgen: unknown --mode '%s'\n", optarg);
                return 2;
            }
            break;
        }
        case 'c':
            /* 100,000 bounds the static arrays and is far above RLIMIT_NOFILE here. */
            opt.conns = parse_int(optarg, "--conns", 1, 100000);
            break;
        case 'd':
            opt.duration = parse_double(optarg, "--duration");
            break;
        case 'w':
            opt.warmup = parse_double(optarg, "--warmup");
            break;
        case 's':
            opt.size = parse_int(optarg, "--size", 2, MAX_SIZE);
            break;
        case 't':
            opt.timeout = parse_double(optarg, "--timeout");
            break;
        case 'H':
            opt.hold_seconds = parse_double(optarg, "--hold-seconds");
            break;
        case 'i':
            opt.inflight = parse_int(optarg, "--inflight", 1, 100000);
            break;
        case 'r':
            opt.rate = parse_double(optarg, "--rate");
            break;
        default:
            usage(ch == '?' ? stdout : stderr);
            return ch == '?' ? 0 : 2;
        }
    }
    if (opt.port == 0) {
        usage(stderr);
        return 2;
    }
    if (opt.timeout < 0) {
        /* Defaults: a churn connection or a UDP datagram unanswered for 1 s is an
         * error (1 s is also Linux's initial SYN retransmission timeout, so a dropped
         * SYN shows up as a timeout, not as a hidden 1 s latency); hold gives up
         * after 5 s without progress. Pingpong never times out: its fairness
         * figures report slow connections instead. */
        opt.timeout = opt.mode == MODE_HOLD ? 5.0 : 1.0;
    }
    if (opt.mode == MODE_PINGPONG)
        opt.timeout = 0;
    if (opt.rate > 0) {
        if (opt.mode != MODE_PINGPONG) {
            fprintf(stderr, "loadgen: --rate applies to --mode pingpong only\n");
            return 2;
        }
        interval_ns = (uint64_t)((double)opt.conns / opt.rate * 1e9);
        if (interval_ns == 0)
            interval_ns = 1;
    }
    if (opt.mode == MODE_HOLD)
        opt.warmup = 0;

    memset(&server_addr, 0, sizeof server_addr);
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server_addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host wants an IPv4 address, got '%s'\n", opt.host);
        return 2;
    }

    /* One descriptor per connection plus stdio and epoll, with some slack. */
    raise_nofile(opt.conns + 64);
    signal(SIGPIPE, SIG_IGN);

    conns = calloc((size_t)opt.conns, sizeof *conns);
    line = malloc(MAX_SIZE);
    rxbuf = malloc(MAX_SIZE);
    if (!conns || !line || !rxbuf)
        die("malloc");
    for (int i = 0; i < opt.size - 1; i++)
        line[i] = (unsigned char)('a' + i % 26);
    line[opt.size - 1] = '\n';
    for (int i = 0; i < opt.conns; i++)
        conns[i].fd = -1;

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");

    if (opt.mode == MODE_HOLD)
        run_hold();
    else
        run_timed();
    fflush(stdout);
    return 0;
}
