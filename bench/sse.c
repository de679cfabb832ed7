/*
 * The streaming half of `make bench`: a paced SSE source and a stream client.
 *
 *   sse serve PORT CERT KEY CHUNKS INTERVAL_MS
 *   sse load  --port P [--tls] --conns N --streams K --ramp S --chunks C
 *             --interval-ms I --deadline S --body JSON [--header 'Name: value']...
 *
 * Why C: the bench box has two cores, shared by the gateway's two workers, its
 * parent, the source and the client.  At 25,000 chunks/s a Python source and a
 * Python client would each burn a large share of a core on TLS and framing, and
 * that CPU would be taken from the gateway under test.  Here each chunk costs a
 * few microseconds, so what is measured is the gateway.
 *
 * serve: HTTPS on 127.0.0.1:PORT.  Every request (any path, keep-alive) gets a
 * vLLM-shaped `text/event-stream` reply in chunked encoding: CHUNKS events,
 * event k due at t0 + k * INTERVAL_MS (an absolute schedule, so lateness does
 * not accumulate), then `data: [DONE]`.  A request body holding
 * "bench_chunks":N or "bench_interval_ms":M overrides them for that stream
 * (a gateway forwards unknown fields untouched).  Each event carries its sequence number
 * and the CLOCK_MONOTONIC time, in ns, at which it was handed to TLS:
 * "bench_i" and "bench_t".
 *
 * load: opens N connections, spread evenly over S seconds, and runs K streams
 * back to back on each (keep-alive).  For every event it records the delivery
 * latency (arrival - bench_t), lost events (gaps in bench_i, or events missing
 * when a stream ends) and stalls (a gap between two events of one stream over
 * INTERVAL_MS + 100 ms).  It prints one JSON object on stdout.
 */
#define _GNU_SOURCE
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
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* A growable byte buffer. */
typedef struct {
    char *p;
    size_t len, off, cap;
} buf_t;

static void buf_add(buf_t *b, const char *data, size_t n) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {
            memmove(b->p, b->p + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 1024;
            while (cap < b->len + n) cap *= 2;
            b->p = realloc(b->p, cap);
            if (!b->p) die("realloc");
            b->cap = cap;
        }
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ------------------------------------------------------------------ serve */

enum { S_HANDSHAKE, S_REQUEST, S_STREAMING };

typedef struct sconn {
    int fd;
    SSL *ssl;
    int state;
    int want_out;          /* EPOLLOUT is armed */
    char in[16384];
    size_t inlen;
    buf_t out;
    int sent;              /* events sent in the current stream */
    int chunks;            /* events in the current stream */
    int64_t interval;
    int64_t t0, due;
    int heap_index;        /* -1 when not scheduled */
    uint64_t stream_id;
} sconn;

static int s_chunks;
static int64_t s_interval;
static int s_epoll;
static sconn **heap;
static int heap_len, heap_cap;
static uint64_t s_streams;

static void heap_swap(int a, int b) {
    sconn *t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    heap[a]->heap_index = a;
    heap[b]->heap_index = b;
}

static void heap_up(int i) {
    while (i > 0) {
        int p = (i - 1) / 2;
        if (heap[p]->due <= heap[i]->due) break;
        heap_swap(p, i);
        i = p;
    }
}

static void heap_down(int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_len && heap[l]->due < heap[m]->due) m = l;
        if (r < heap_len && heap[r]->due < heap[m]->due) m = r;
        if (m == i) break;
        heap_swap(m, i);
        i = m;
    }
}

static void heap_push(sconn *c) {
    if (heap_len == heap_cap) {
        heap_cap = heap_cap ? heap_cap * 2 : 1024;
        heap = realloc(heap, heap_cap * sizeof *heap);
        if (!heap) die("realloc");
    }
    heap[heap_len] = c;
    c->heap_index = heap_len++;
    heap_up(c->heap_index);
}

static void heap_remove(sconn *c) {
    int i = c->heap_index;
    if (i < 0) return;
    c->heap_index = -1;
    heap_len--;
    if (i != heap_len) {
        heap[i] = heap[heap_len];
        heap[i]->heap_index = i;
        heap_down(i);
        heap_up(i);
    }
}

static void s_close(sconn *c) {
    heap_remove(c);
    epoll_ctl(s_epoll, EPOLL_CTL_DEL, c->fd, NULL);
    SSL_free(c->ssl);
    close(c->fd);
    buf_free(&c->out);
    free(c);
}

static void s_arm(sconn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(s_epoll, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

/* Write what is pending; 0 if the connection is still usable, -1 if it broke. */
static int s_flush(sconn *c) {
    while (c->out.len > c->out.off) {
        int n = SSL_write(c->ssl, c->out.p + c->out.off, (int)(c->out.len - c->out.off));
        if (n > 0) {
            c->out.off += n;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
            s_arm(c, 1);
            return 0;
        }
        return -1;
    }
    c->out.off = c->out.len = 0;
    s_arm(c, 0);
    return 0;
}

static const char HEAD[] =
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: text/event-stream\r\n"
    "Cache-Control: no-cache\r\n"
    "Transfer-Encoding: chunked\r\n"
    "\r\n";

/* One event of a chat.completion.chunk, framed as one HTTP chunk. */
static void s_event(sconn *c) {
    char data[512], frame[600];
    int64_t t = now_ns();
    int n = snprintf(data, sizeof data,
                     "data: {\"id\":\"chatcmpl-bench%llu\",\"object\":\"chat.completion.chunk\","
                     "\"created\":1700000000,\"model\":\"TheBloke/Mistral-7B-Instruct-v0.2-AWQ\","
                     "\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},"
                     "\"logprobs\":null,\"finish_reason\":null}],"
                     "\"bench_i\":%d,\"bench_t\":%lld}\n\n",
                     (unsigned long long)c->stream_id, c->sent, (long long)t);
    int m = snprintf(frame, sizeof frame, "%x\r\n%s\r\n", n, data);
    buf_add(&c->out, frame, m);
    c->sent++;
}

static void s_finish_stream(sconn *c) {
    static const char tail[] = "e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
    buf_add(&c->out, tail, sizeof tail - 1);
    c->state = S_REQUEST;
    c->inlen = 0;
}

/* A whole request in c->in?  Returns its length, or 0. */
static size_t s_request_length(sconn *c) {
    char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end + 4 - c->in, body = 0;
    for (char *p = c->in; p < end; p++) {
        if ((p == c->in || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
            body = strtoul(p + 15, NULL, 10);
            break;
        }
    }
    return c->inlen >= head + body ? head + body : 0;
}

static void s_start_stream(sconn *c, size_t length) {
    char *p;
    c->chunks = s_chunks;
    c->interval = s_interval;
    if ((p = memmem(c->in, length, "\"bench_chunks\":", 15))) c->chunks = atoi(p + 15);
    if ((p = memmem(c->in, length, "\"bench_interval_ms\":", 20)))
        c->interval = (int64_t)(atof(p + 20) * 1e6);
    c->state = S_STREAMING;
    c->stream_id = ++s_streams;
    c->sent = 0;
    buf_add(&c->out, HEAD, sizeof HEAD - 1);
    c->t0 = now_ns();
    s_event(c);
    if (c->sent >= c->chunks) {
        s_finish_stream(c);
    } else {
        c->due = c->t0 + c->interval;
        heap_push(c);
    }
}

static void s_readable(sconn *c) {
    if (c->state == S_HANDSHAKE) {
        int r = SSL_accept(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) return;
            if (e == SSL_ERROR_WANT_WRITE) {
                s_arm(c, 1);
                return;
            }
            s_close(c);
            return;
        }
        c->state = S_REQUEST;
    }
    for (;;) {
        char scratch[4096];
        char *into = c->state == S_REQUEST ? c->in + c->inlen : scratch;
        int room = c->state == S_REQUEST ? (int)(sizeof c->in - c->inlen) : (int)sizeof scratch;
        if (room == 0) {
            s_close(c);
            return;
        }
        int n = SSL_read(c->ssl, into, room);
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ) break;
            if (e == SSL_ERROR_WANT_WRITE) {
                s_arm(c, 1);
                break;
            }
            s_close(c);
            return;
        }
        if (c->state == S_REQUEST) {
            c->inlen += n;
            size_t length = s_request_length(c);
            if (length) s_start_stream(c, length);
        }
    }
    if (s_flush(c) < 0) s_close(c);
}

/* Send every event that is due.  Called between any two socket events, so
 * that a burst of TLS handshakes cannot hold back the events of open streams. */
static void s_run_due(void) {
    int64_t now = now_ns();
    while (heap_len && heap[0]->due <= now) {
        sconn *c = heap[0];
        heap_remove(c);
        s_event(c);
        if (c->sent >= c->chunks) {
            s_finish_stream(c);
        } else {
            c->due = c->t0 + (int64_t)c->sent * c->interval;
            heap_push(c);
        }
        if (s_flush(c) < 0) s_close(c);
    }
}

static int serve_main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: sse serve PORT CERT KEY CHUNKS INTERVAL_MS\n");
        return 2;
    }
    int port = atoi(argv[2]);
    s_chunks = atoi(argv[5]);
    s_interval = (int64_t)(atof(argv[6]) * 1e6);
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[3]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(lfd, 8192) < 0) die("listen");
    nonblocking(lfd);

    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    s_epoll = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(s_epoll, EPOLL_CTL_ADD, lfd, &ev);
    static int timer_tag;
    ev.data.ptr = &timer_tag;
    epoll_ctl(s_epoll, EPOLL_CTL_ADD, tfd, &ev);
    printf("listening %d\n", port);
    fflush(stdout);

    int64_t armed = -1;
    struct epoll_event events[64];
    for (;;) {
        int64_t want = heap_len ? heap[0]->due : 0;
        if (want != armed) {
            struct itimerspec its = {0};
            if (want) {
                its.it_value.tv_sec = want / 1000000000LL;
                its.it_value.tv_nsec = want % 1000000000LL;
            }
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = want;
        }
        int n = epoll_wait(s_epoll, events, 64, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            if (tag == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    sconn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->heap_index = -1;
                    c->ssl = SSL_new(ctx);
                    SSL_set_fd(c->ssl, fd);
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(s_epoll, EPOLL_CTL_ADD, fd, &cev);
                    s_readable(c);
                    if (heap_len) s_run_due();
                }
            } else if (tag == &timer_tag) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0) { /* spurious */ }
                armed = -1;
            } else {
                sconn *c = tag;
                if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                    s_readable(c); /* may free c */
                } else if (events[i].events & EPOLLOUT) {
                    if (c->state == S_HANDSHAKE) s_readable(c);
                    else if (s_flush(c) < 0) s_close(c);
                }
            }
            if (heap_len) s_run_due();
        }
        s_run_due();
    }
}

/* ------------------------------------------------------------------- load */

enum { C_IDLE, C_CONNECTING, C_HANDSHAKE, C_HEAD, C_SIZE, C_DATA, C_DATA_CRLF, C_TRAILER };

typedef struct cconn {
    int fd;
    SSL *ssl;
    int state;
    int slot;
    int streams_left;
    int want_out;
    buf_t in;      /* raw bytes not yet parsed */
    buf_t sse;     /* event-stream bytes not yet split into events */
    buf_t out;     /* request bytes not yet sent */
    size_t chunk_left;
    int next_index;   /* the bench_i expected next */
    int done_seen;
    int64_t last_arrival;
    int in_stream;
} cconn;

static struct {
    int port, tls, conns, streams, chunks;
    double ramp, deadline;
    int64_t interval;
    const char *body;
    char headers[4096];
} L;

static struct {
    uint64_t ok, failed, events, lost, stalls, connect_errors, status_errors, broken, open, peak_open;
    int64_t max_gap, all_open_at;
    int32_t *lat;   /* microseconds */
    size_t nlat, caplat;
    int status_seen;
} R;

static int c_epoll;
static SSL_CTX *c_ctx;
static char request[16384];
static int request_len;

static void c_arm(cconn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(c_epoll, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

static void lat_add(int64_t ns) {
    if (R.nlat == R.caplat) {
        R.caplat = R.caplat ? R.caplat * 2 : 65536;
        R.lat = realloc(R.lat, R.caplat * sizeof *R.lat);
        if (!R.lat) die("realloc");
    }
    int64_t us = ns / 1000;
    R.lat[R.nlat++] = us > INT32_MAX ? INT32_MAX : (int32_t)us;
}

static void c_stream_over(cconn *c, int ok) {
    if (!c->in_stream) return;
    c->in_stream = 0;
    R.open--;
    if (c->next_index < L.chunks) {
        R.lost += L.chunks - c->next_index;
        ok = 0;
    }
    if (!c->done_seen) ok = 0;
    if (ok) R.ok++;
    else R.failed++;
    c->streams_left--;
}

static void c_close(cconn *c) {
    if (c->fd >= 0) {
        epoll_ctl(c_epoll, EPOLL_CTL_DEL, c->fd, NULL);
        if (c->ssl) SSL_free(c->ssl);
        c->ssl = NULL;
        close(c->fd);
        c->fd = -1;
    }
    c->in.len = c->in.off = 0;
    c->sse.len = c->sse.off = 0;
    c->out.len = c->out.off = 0;
    c->state = C_IDLE;
    c->want_out = 0;
}

static void c_fail(cconn *c) {
    if (c->in_stream) R.broken++;
    c_stream_over(c, 0);
    c_close(c);
}

static void c_send_request(cconn *c) {
    c->in_stream = 1;
    R.open++;
    if (R.open > R.peak_open) R.peak_open = R.open;
    if (R.open == (uint64_t)L.conns && !R.all_open_at) R.all_open_at = now_ns();
    c->next_index = 0;
    c->done_seen = 0;
    c->last_arrival = 0;
    c->state = C_HEAD;
    c->sse.len = c->sse.off = 0;
    buf_add(&c->out, request, request_len);
}

static int c_flush(cconn *c) {
    while (c->out.len > c->out.off) {
        ssize_t n;
        if (c->ssl) {
            int r = SSL_write(c->ssl, c->out.p + c->out.off, (int)(c->out.len - c->out.off));
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    c_arm(c, 1);
                    return 0;
                }
                return -1;
            }
            n = r;
        } else {
            n = send(c->fd, c->out.p + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) {
                    c_arm(c, 1);
                    return 0;
                }
                return -1;
            }
        }
        c->out.off += n;
    }
    c->out.len = c->out.off = 0;
    c_arm(c, 0);
    return 0;
}

static void c_event(cconn *c, const char *ev, size_t n, int64_t arrival) {
    if (n >= 12 && memcmp(ev, "data: [DONE]", 12) == 0) {
        c->done_seen = 1;
        return;
    }
    char *pi = memmem(ev, n, "\"bench_i\":", 10);
    char *pt = memmem(ev, n, "\"bench_t\":", 10);
    if (!pi || !pt) return;
    int index = atoi(pi + 10);
    int64_t t = strtoll(pt + 10, NULL, 10);
    if (arrival < t) arrival = now_ns(); /* it came in while this batch was handled */
    if (index > c->next_index) R.lost += index - c->next_index;
    if (index >= c->next_index) c->next_index = index + 1;
    R.events++;
    lat_add(arrival - t);
    if (c->last_arrival) {
        int64_t gap = arrival - c->last_arrival;
        if (gap > R.max_gap) R.max_gap = gap;
        if (gap > L.interval + 100000000LL) R.stalls++;
    }
    c->last_arrival = arrival;
}

static void c_sse(cconn *c, const char *data, size_t n, int64_t arrival) {
    buf_add(&c->sse, data, n);
    for (;;) {
        char *start = c->sse.p + c->sse.off;
        size_t avail = c->sse.len - c->sse.off;
        char *end = memmem(start, avail, "\n\n", 2);
        if (!end) break;
        c_event(c, start, end - start, arrival);
        c->sse.off += end + 2 - start;
    }
}

/* Parse what arrived; returns -1 when the connection must go. */
static int c_parse(cconn *c, int64_t arrival) {
    for (;;) {
        char *p = c->in.p + c->in.off;
        size_t avail = c->in.len - c->in.off;
        if (c->state == C_HEAD) {
            char *end = memmem(p, avail, "\r\n\r\n", 4);
            if (!end) return 0;
            int status = 0;
            sscanf(p, "HTTP/1.%*d %d", &status);
            int chunked = 0;
            for (char *q = p + 1; q < end; q++)
                if (q[-1] == '\n' && strncasecmp(q, "transfer-encoding: chunked", 26) == 0) chunked = 1;
            c->in.off += end + 4 - p;
            if (status != 200 || !chunked) {
                if (!R.status_seen) {
                    R.status_seen = status;
                    fprintf(stderr, "unexpected reply: %.*s\n", (int)(end - p), p);
                }
                R.status_errors++;
                return -1;
            }
            c->state = C_SIZE;
        } else if (c->state == C_SIZE) {
            char *end = memmem(p, avail, "\r\n", 2);
            if (!end) return 0;
            c->chunk_left = strtoul(p, NULL, 16);
            c->in.off += end + 2 - p;
            c->state = c->chunk_left ? C_DATA : C_TRAILER;
        } else if (c->state == C_DATA) {
            if (!avail) return 0;
            size_t take = avail < c->chunk_left ? avail : c->chunk_left;
            c_sse(c, p, take, arrival);
            c->in.off += take;
            c->chunk_left -= take;
            if (!c->chunk_left) c->state = C_DATA_CRLF;
        } else if (c->state == C_DATA_CRLF) {
            if (avail < 2) return 0;
            c->in.off += 2;
            c->state = C_SIZE;
        } else if (c->state == C_TRAILER) {
            if (avail < 2) return 0;
            c->in.off += 2; /* no trailers are sent */
            c_stream_over(c, 1);
            if (c->streams_left > 0) {
                c_send_request(c);
                if (c_flush(c) < 0) return -1;
            } else {
                c_close(c);
                return 1;
            }
        } else {
            return 0;
        }
    }
}

static void c_start(cconn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        R.connect_errors++;
        R.failed += c->streams_left;
        R.lost += (uint64_t)c->streams_left * L.chunks;
        c->streams_left = 0;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(L.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connect(c->fd, (struct sockaddr *)&a, sizeof a);
    c->state = C_CONNECTING;
    c->want_out = 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(c_epoll, EPOLL_CTL_ADD, c->fd, &ev);
}

static void c_ready(cconn *c, uint32_t events, int64_t ready_at) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            R.connect_errors++;
            c_close(c);
            c->streams_left--;
            R.failed++;
            R.lost += L.chunks;
            if (c->streams_left > 0) c_start(c);
            return;
        }
        if (L.tls) {
            c->ssl = SSL_new(c_ctx);
            SSL_set_fd(c->ssl, c->fd);
            c->state = C_HANDSHAKE;
        } else {
            c_send_request(c);
        }
    }
    if (c->state == C_HANDSHAKE) {
        int r = SSL_connect(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) { c_arm(c, 0); return; }
            if (e == SSL_ERROR_WANT_WRITE) { c_arm(c, 1); return; }
            R.connect_errors++;
            c_close(c);
            c->streams_left--;
            R.failed++;
            R.lost += L.chunks;
            if (c->streams_left > 0) c_start(c);
            return;
        }
        c_send_request(c);
    }
    if (c_flush(c) < 0) {
        c_fail(c);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    /* The bytes were there when epoll said so: the client's own work on other
     * connections in the same batch is not the gateway's latency. */
    int64_t arrival = ready_at;
    for (;;) {
        char tmp[65536];
        ssize_t n;
        if (c->ssl) {
            int r = SSL_read(c->ssl, tmp, sizeof tmp);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ) return;
                if (e == SSL_ERROR_WANT_WRITE) { c_arm(c, 1); return; }
                n = -1;
            } else {
                n = r;
            }
        } else {
            n = recv(c->fd, tmp, sizeof tmp, 0);
            if (n < 0 && errno == EAGAIN) return;
        }
        if (n <= 0) {
            c_fail(c);
            if (c->streams_left > 0) c_start(c);
            return;
        }
        buf_add(&c->in, tmp, n);
        int r = c_parse(c, arrival);
        if (r < 0) {
            c_fail(c);
            if (c->streams_left > 0) c_start(c);
            return;
        }
        if (r > 0) return; /* closed: all its streams are done */
    }
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static double pct(double q) {
    if (!R.nlat) return -1;
    size_t i = (size_t)(q * (R.nlat - 1) + 0.5);
    return R.lat[i] / 1000.0;
}

static int load_main(int argc, char **argv) {
    L.conns = 1;
    L.streams = 1;
    L.chunks = 10;
    L.interval = 20000000;
    L.deadline = 60;
    L.body = "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"stream\":true}";
    size_t hlen = 0;
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(k, "--tls")) { L.tls = 1; continue; }
        i++;
        if (!strcmp(k, "--port")) L.port = atoi(v);
        else if (!strcmp(k, "--conns")) L.conns = atoi(v);
        else if (!strcmp(k, "--streams")) L.streams = atoi(v);
        else if (!strcmp(k, "--chunks")) L.chunks = atoi(v);
        else if (!strcmp(k, "--interval-ms")) L.interval = (int64_t)(atof(v) * 1e6);
        else if (!strcmp(k, "--ramp")) L.ramp = atof(v);
        else if (!strcmp(k, "--deadline")) L.deadline = atof(v);
        else if (!strcmp(k, "--body")) L.body = v;
        else if (!strcmp(k, "--header")) {
            hlen += snprintf(L.headers + hlen, sizeof L.headers - hlen, "%s\r\n", v);
        } else {
            fprintf(stderr, "unknown option %s\n", k);
            return 2;
        }
    }
    request_len = snprintf(request, sizeof request,
                           "POST /v1/chat/completions HTTP/1.1\r\n"
                           "Host: 127.0.0.1:%d\r\n"
                           "Content-Type: application/json\r\n"
                           "Accept: text/event-stream\r\n"
                           "%s"
                           "Content-Length: %zu\r\n\r\n%s",
                           L.port, L.headers, strlen(L.body), L.body);
    signal(SIGPIPE, SIG_IGN);
    c_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(c_ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_mode(c_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    c_epoll = epoll_create1(0);

    cconn *conns = calloc(L.conns, sizeof *conns);
    for (int i = 0; i < L.conns; i++) {
        conns[i].fd = -1;
        conns[i].slot = i;
        conns[i].streams_left = L.streams;
    }
    int64_t start = now_ns();
    int64_t stop = start + (int64_t)(L.deadline * 1e9);
    int started = 0;
    struct epoll_event events[1024];
    for (;;) {
        int64_t now = now_ns();
        while (started < L.conns &&
               now >= start + (int64_t)(L.ramp * 1e9 * started / L.conns)) {
            c_start(&conns[started++]);
        }
        if (now >= stop) break;
        int live = 0;
        for (int i = 0; i < started && !live; i++) live = conns[i].streams_left > 0;
        if (started == L.conns && !live) break;
        int64_t wait_ns = stop - now;
        if (started < L.conns) {
            int64_t next = start + (int64_t)(L.ramp * 1e9 * started / L.conns) - now;
            if (next < wait_ns) wait_ns = next;
        }
        int timeout = (int)((wait_ns + 999999) / 1000000);
        if (timeout > 100) timeout = 100;
        int n = epoll_wait(c_epoll, events, 1024, timeout);
        int64_t ready_at = now_ns();
        for (int i = 0; i < n; i++) c_ready(events[i].data.ptr, events[i].events, ready_at);
    }
    int64_t ended = now_ns();
    /* Whatever is still running at the deadline failed. */
    for (int i = 0; i < L.conns; i++) {
        cconn *c = &conns[i];
        if (c->in_stream) {
            R.broken++;
            c_stream_over(c, 0);
        }
        if (c->streams_left > 0) {
            R.failed += c->streams_left;
            R.lost += (uint64_t)c->streams_left * L.chunks;
            c->streams_left = 0;
        }
        c_close(c);
    }
    qsort(R.lat, R.nlat, sizeof *R.lat, cmp_i32);
    printf("{\"streams_ok\":%llu,\"streams_failed\":%llu,\"streams_expected\":%llu,"
           "\"events\":%llu,\"events_expected\":%llu,\"lost\":%llu,\"stalls\":%llu,"
           "\"max_gap_ms\":%.1f,\"connect_errors\":%llu,\"status_errors\":%llu,"
           "\"broken\":%llu,\"peak_open\":%llu,\"all_open_s\":%.3f,\"seconds\":%.3f,"
           "\"lat_p50_ms\":%.3f,\"lat_p90_ms\":%.3f,\"lat_p99_ms\":%.3f,"
           "\"lat_p999_ms\":%.3f,\"lat_max_ms\":%.3f}\n",
           (unsigned long long)R.ok, (unsigned long long)R.failed,
           (unsigned long long)L.conns * L.streams, (unsigned long long)R.events,
           (unsigned long long)L.conns * L.streams * L.chunks, (unsigned long long)R.lost,
           (unsigned long long)R.stalls, R.max_gap / 1e6, (unsigned long long)R.connect_errors,
           (unsigned long long)R.status_errors, (unsigned long long)R.broken,
           (unsigned long long)R.peak_open,
           R.all_open_at ? (R.all_open_at - start) / 1e9 : -1.0, (ended - start) / 1e9,
           pct(0.50), pct(0.90), pct(0.99), pct(0.999), R.nlat ? R.lat[R.nlat - 1] / 1000.0 : -1);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "serve")) return serve_main(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "load")) return load_main(argc, argv);
    fprintf(stderr, "usage: sse serve ... | sse load ...\n");
    return 2;
}
