/*
 * echo_epoll: the smallest useful echo server, the physical limit of the benchmark.
 *
 * Strategy. One thread, one level-triggered epoll set. TCP: every byte read is
 * written straight back; if the peer does not read and the write is short, the rest
 * is kept and the connection stops reading until it has drained (so a slow reader
 * costs one read's worth of memory, never more). UDP: each
 * datagram is sent back to its source. No framing, no allocation per request.
 *
 *   echo_epoll --port P [--udp] [--host 127.0.0.1]
 *
 * Prints "READY <port>" once listening (port 0 picks a free port); exits 0 on
 * SIGTERM or SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 512

/* A connection with a short write keeps the unsent rest here; one that keeps up
 * (every connection in these benchmarks) has no buffer at all, so holding 5,000
 * idle connections costs the kernel's socket memory and nothing of ours. */
struct pending {
    size_t len;
    size_t off;
    unsigned char data[];
};

static volatile sig_atomic_t stopping;
/* Indexed by descriptor: fd_state 1 = an open connection of ours; fd_pending holds
 * its unsent bytes, if any. */
static unsigned char *fd_state;
static struct pending **fd_pending;
static size_t fd_len;
static int epfd;
static unsigned char rxbuf[BUF_SIZE];

static void on_signal(int signum)
{
    (void)signum;
    stopping = 1;
}

static void die(const char *what)
{
    fprintf(stderr, "echo_epoll: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void drop(int fd)
{
    free(fd_pending[fd]);
    fd_pending[fd] = NULL;
    fd_state[fd] = 0;
    close(fd);
}

static void set_events(int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) != 0)
        die("epoll_ctl(MOD)");
}

/* Send data[0..len); keep what the socket would not take. False: drop the peer. */
static bool send_or_keep(int fd, const unsigned char *data, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN)
                return false;
            struct pending *p = malloc(sizeof *p + (len - off));
            if (!p)
                return false;
            p->len = len - off;
            p->off = 0;
            memcpy(p->data, data + off, len - off);
            fd_pending[fd] = p;
            /* Stop reading until the peer has taken what it was sent. */
            set_events(fd, EPOLLOUT);
            return true;
        }
        off += (size_t)n;
    }
    return true;
}

static void on_readable(int fd)
{
    ssize_t n = recv(fd, rxbuf, BUF_SIZE, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
        drop(fd); /* EOF or reset: either way the conversation is over */
        return;
    }
    if (n > 0 && !send_or_keep(fd, rxbuf, (size_t)n))
        drop(fd);
}

static void on_writable(int fd)
{
    struct pending *p = fd_pending[fd];
    while (p && p->off < p->len) {
        ssize_t n = send(fd, p->data + p->off, p->len - p->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            drop(fd);
            return;
        }
        p->off += (size_t)n;
    }
    free(p);
    fd_pending[fd] = NULL;
    set_events(fd, EPOLLIN);
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            if (errno == ECONNABORTED)
                continue;
            /* EMFILE/ENFILE/ENOMEM: leave the rest in the backlog for the next
             * wake-up; RLIMIT_NOFILE is raised at start, so this is not expected
             * below the hard limit. */
            perror("echo_epoll: accept4");
            return;
        }
        if ((size_t)fd >= fd_len) {
            size_t len = fd_len ? fd_len : 1024;
            while (len <= (size_t)fd)
                len *= 2;
            unsigned char *st = realloc(fd_state, len);
            if (!st)
                die("realloc");
            fd_state = st;
            struct pending **pp = realloc(fd_pending, len * sizeof *pp);
            if (!pp)
                die("realloc");
            fd_pending = pp;
            memset(fd_state + fd_len, 0, len - fd_len);
            memset(fd_pending + fd_len, 0, (len - fd_len) * sizeof *pp);
            fd_len = len;
        }
        fd_state[fd] = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
            die("epoll_ctl(ADD)");
    }
}

static int serve_tcp(int lfd)
{
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) != 0)
        die("epoll_ctl(listener)");
    struct epoll_event evs[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                accept_all(lfd);
                continue;
            }
            if ((size_t)fd >= fd_len || fd_state[fd] == 0)
                continue;
            if (fd_pending[fd])
                on_writable(fd);
            else
                on_readable(fd);
        }
    }
    return 0;
}

static int serve_udp(int sfd)
{
    unsigned char *buf = rxbuf;
    while (!stopping) {
        struct sockaddr_storage from;
        socklen_t fromlen = sizeof from;
        /* Blocking recvfrom: one socket needs no epoll; SIGTERM interrupts it
         * (the handler is installed without SA_RESTART). */
        ssize_t n = recvfrom(sfd, buf, BUF_SIZE, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recvfrom");
        }
        /* A failed sendto (the client's buffer full, the client gone) loses that
         * datagram, which is what UDP promises; the client counts it as lost. */
        (void)sendto(sfd, buf, (size_t)n, 0, (struct sockaddr *)&from, fromlen);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    long port = -1;
    bool udp = false;
    static const struct option longopts[] = {
        {"port", required_argument, 0, 'p'},
        {"host", required_argument, 0, 'h'},
        {"udp", no_argument, 0, 'u'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'p': {
            char *end;
            port = strtol(optarg, &end, 10);
            if (*optarg == '\0' || *end != '\0' || port < 0 || port > 65535) {
                fprintf(stderr, "echo_epoll: --port wants 0..65535, got '%s'\n", optarg);
                return 2;
            }
            break;
        }
        case 'h':
            host = optarg;
            break;
        case 'u':
            udp = true;
            break;
        default:
            fprintf(stderr, "usage: echo_epoll --port P [--udp] [--host 127.0.0.1]\n");
            return 2;
        }
    }
    if (port < 0) {
        fprintf(stderr, "usage: echo_epoll --port P [--udp] [--host 127.0.0.1]\n");
        return 2;
    }

    /* Thousands of concurrent connections need as many descriptors: take the hard
     * limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: blocking calls return EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "echo_epoll: --host wants an IPv4 address, got '%s'\n", host);
        return 2;
    }
    int fd = socket(AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        die("bind");
    if (!udp) {
        /* Linux silently caps the backlog at net.core.somaxconn (4096 since 5.4);
         * asking for the maximum int gets whatever the system allows. */
        if (listen(fd, 0x7fffffff) != 0)
            die("listen");
        /* Non-blocking, so accept_all() can drain the queue until EAGAIN. */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0)
            die("fcntl(O_NONBLOCK)");
    }
    socklen_t alen = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &alen) != 0)
        die("getsockname");
    printf("READY %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    return udp ? serve_udp(fd) : serve_tcp(fd);
}
