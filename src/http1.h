/* http1.c: HTTP/1.1's wire format on http-parser. Requests are parsed
 * under their size limits into a request the handler side can take;
 * response heads and bodies are framed. No sockets, no loop, no Lua:
 * server_conn.c drives it. */
#ifndef AIORCH_HTTP1_H
#define AIORCH_HTTP1_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <http_parser.h>

#include "aiorch.h"

/* The bytes a server holds for its clients' input (request bodies and
 * pipelined requests), against max (0: no cap). */
typedef struct aiorch_pool {
    size_t used, max;
} aiorch_pool;

typedef struct aiorch_buf {
    char *p;
    size_t off, len, cap; /* bytes [off, len) are live */
    aiorch_pool *pool;    /* counts cap, or NULL */
    size_t ceil;          /* growth stops here while that is enough (0: none) */
    int capped;           /* growth that would pass pool->max fails */
} aiorch_buf;

/* aiorch_buf_reserve's failures */
enum { AIORCH_BUF_OOM = -1, AIORCH_BUF_OVER = -2 };

int aiorch_pool_full(const aiorch_pool *pool, uint64_t n);
int aiorch_buf_reserve(aiorch_buf *b, size_t n);
int aiorch_buf_add(aiorch_buf *b, const void *s, size_t n);
void aiorch_buf_free(aiorch_buf *b); /* the bytes; the pool, ceiling and cap stay */

/* Tokens and field values (RFC 9110 5.1, 5.5). */
int aiorch_h1_is_tchar(unsigned char ch);
int aiorch_h1_is_token(const char *s, size_t n);
int aiorch_h1_is_field_value(const char *s, size_t n); /* no CR, LF or NUL */
int aiorch_h1_name_is(const char *s, size_t n, const char *lit);
int aiorch_h1_has_token(const char *s, size_t n, const char *tok);
const char *aiorch_h1_reason(int status);

/* Where a connection is in reading a request. */
enum { AIORCH_H1_IDLE, AIORCH_H1_HEAD, AIORCH_H1_BODY };

/* c->reject when the head hook answered the request itself */
#define AIORCH_H1_ANSWERED 1

/* One request being read. The url and headers are kept in scratch, the
 * body in body; the hooks are the owner's. */
typedef struct aiorch_h1_req {
    http_parser parser;
    aiorch_buf scratch, body;
    struct aiorch_h1_hdr *hdrs;
    size_t nhdrs, hdrs_cap, url_len;
    int hstate;    /* 0: none yet, 1: in a header name, 2: in a value */
    int line_done; /* the value's line ended: more of it is obsolete folding */
    int phase;     /* AIORCH_H1_* */
    int reject;    /* status for a request refused while parsing, or AIORCH_H1_ANSWERED */
    int failed;    /* the owner's connection failed inside a hook */
    const char *parse_start, *parse_end; /* the bytes http_parser is given */
    size_t max_header, max_body;
    aiorch_pool *pool;
    /* Called as a request begins; once its head is in (the request is then
     * whole but for its body: 0 goes on, -1 stops with reject set); and when
     * the client waits for "100 Continue" before it sends a body that
     * passed the limits (0, or -1 when the connection failed). */
    void (*on_begin)(struct aiorch_h1_req *q);
    int (*on_head)(struct aiorch_h1_req *q);
    int (*on_continue)(struct aiorch_h1_req *q);
    void *data;
} aiorch_h1_req;

void aiorch_h1_req_init(aiorch_h1_req *q, aiorch_pool *pool);
void aiorch_h1_req_free(aiorch_h1_req *q);
/* Drops the url and headers (the owner has copies); the body stays. */
void aiorch_h1_req_drop_head(aiorch_h1_req *q);

/* Parses n bytes; returns how many were used. Stops after a whole request
 * (*complete = 1; the parser is paused until the next call), or on an
 * error (*status: the status to refuse it with, or AIORCH_H1_ANSWERED). */
size_t aiorch_h1_parse(aiorch_h1_req *q, const char *p, size_t n, int *complete, int *status);

/* The request whose head is in, as a host hands it over. headers must
 * hold q->nhdrs entries; they point into q's scratch until the next call. */
void aiorch_h1_request(const aiorch_h1_req *q, aiorch_http_request *out, aiorch_header *headers);

/* How a response to this request is framed. */
typedef struct aiorch_h1_frame {
    unsigned chunked : 1, close : 1, head : 1, http10 : 1, keep_alive : 1;
} aiorch_h1_frame;

/* Appends the status line and headers of res to b, for a request with the
 * facts in f (head, http10, keep_alive); sets f->chunked and f->close.
 * Returns 0, or -1 when out of memory (b is left as it was). */
int aiorch_h1_head(aiorch_buf *b, const aiorch_http_response *res, aiorch_h1_frame *f);

/* A plain answer: status, content type and body, then the close. */
int aiorch_h1_plain(aiorch_buf *b, int status, const char *type, const char *body, size_t len);

/* Frames body bytes in iov (at most 3 parts; hex holds 24 bytes); returns
 * the number of parts. */
int aiorch_h1_body(const aiorch_h1_frame *f, const char *data, size_t n, int last,
                   struct iovec *iov, char *hex);

#endif
