/* HTTP/1.1's wire format on http-parser: requests read under their size
 * limits, responses framed (see http1.h). */
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http1.h"

#define H1_MAX_HEADERS 256

/* One request header: offsets into the scratch buffer, which may move. */
typedef struct aiorch_h1_hdr {
    size_t name, name_len, value, value_len;
} aiorch_h1_hdr;

/* ---- buffers ---------------------------------------------------------- */

/* Whether n more bytes would take the pool past its max. */
int aiorch_pool_full(const aiorch_pool *pool, uint64_t n)
{
    return pool->max && (pool->used > pool->max || n > pool->max - pool->used);
}

/* Makes room for n more bytes, doubling. Returns 0, AIORCH_BUF_OOM, or
 * AIORCH_BUF_OVER when a capped buffer would take its pool past its max. */
int aiorch_buf_reserve(aiorch_buf *b, size_t n)
{
    size_t cap;
    char *p;

    if (b->cap - b->len >= n) return 0;
    if (b->off > 0) { /* reuse the consumed front before growing */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n) return 0;
    }
    cap = b->cap ? b->cap : 1024;
    while (cap - b->len < n) {
        if (cap > SIZE_MAX / 2) return AIORCH_BUF_OOM;
        cap *= 2;
    }
    if (b->ceil && cap > b->ceil && b->ceil - b->len >= n) cap = b->ceil;
    if (b->capped && aiorch_pool_full(b->pool, cap - b->cap)) return AIORCH_BUF_OVER;
    p = realloc(b->p, cap);
    if (!p) return AIORCH_BUF_OOM;
    if (b->pool) b->pool->used += cap - b->cap;
    b->p = p;
    b->cap = cap;
    return 0;
}

int aiorch_buf_add(aiorch_buf *b, const void *s, size_t n)
{
    int rc;
    if (n == 0) return 0;
    if ((rc = aiorch_buf_reserve(b, n)) != 0) return rc;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

#define buf_lit(b, s) aiorch_buf_add((b), (s), sizeof(s) - 1)

static int buf_fmt(aiorch_buf *b, const char *fmt, ...)
{
    size_t room = 128;
    for (;;) {
        va_list ap;
        int n;
        if (aiorch_buf_reserve(b, room)) return -1;
        va_start(ap, fmt);
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) return -1;
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return 0;
        }
        room = (size_t)n + 1;
    }
}

void aiorch_buf_free(aiorch_buf *b)
{
    if (b->pool) b->pool->used -= b->cap;
    free(b->p);
    b->p = NULL;
    b->off = b->len = b->cap = 0;
}

/* ---- tokens and reasons ------------------------------------------------ */

static const struct {
    int status;
    const char *reason;
} h1_reasons[] = {
    {100, "Continue"},
    {200, "OK"},
    {201, "Created"},
    {202, "Accepted"},
    {204, "No Content"},
    {206, "Partial Content"},
    {301, "Moved Permanently"},
    {302, "Found"},
    {303, "See Other"},
    {304, "Not Modified"},
    {307, "Temporary Redirect"},
    {308, "Permanent Redirect"},
    {400, "Bad Request"},
    {401, "Unauthorized"},
    {402, "Payment Required"},
    {403, "Forbidden"},
    {404, "Not Found"},
    {405, "Method Not Allowed"},
    {408, "Request Timeout"},
    {409, "Conflict"},
    {410, "Gone"},
    {411, "Length Required"},
    {413, "Payload Too Large"},
    {415, "Unsupported Media Type"},
    {422, "Unprocessable Entity"},
    {429, "Too Many Requests"},
    {431, "Request Header Fields Too Large"},
    {500, "Internal Server Error"},
    {501, "Not Implemented"},
    {502, "Bad Gateway"},
    {503, "Service Unavailable"},
    {504, "Gateway Timeout"},
    {529, "Overloaded"},
};

const char *aiorch_h1_reason(int status)
{
    size_t i;
    for (i = 0; i < sizeof h1_reasons / sizeof h1_reasons[0]; i++)
        if (h1_reasons[i].status == status) return h1_reasons[i].reason;
    return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
}

/* RFC 9110's tchar: ALPHA, DIGIT and !#$%&'*+-.^_`|~, one bit a byte
 * (every header name's bytes are looked up here). */
static const uint64_t TCHAR_BITS[4] = {0x03ff6cfa00000000u, 0x57ffffffc7fffffeu, 0, 0};

int aiorch_h1_is_tchar(unsigned char ch)
{
    return (int)((TCHAR_BITS[ch >> 6] >> (ch & 63)) & 1);
}

int aiorch_h1_is_token(const char *s, size_t n)
{
    size_t i;
    if (n == 0) return 0;
    for (i = 0; i < n; i++)
        if (!aiorch_h1_is_tchar((unsigned char)s[i])) return 0;
    return 1;
}

/* CR and LF would let a value smuggle in headers of its own. */
int aiorch_h1_is_field_value(const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 0;
    return 1;
}

int aiorch_h1_name_is(const char *s, size_t n, const char *lit)
{
    return strlen(lit) == n && strncasecmp(s, lit, n) == 0;
}

/* Whether a comma-separated header value lists the token tok. */
int aiorch_h1_has_token(const char *s, size_t n, const char *tok)
{
    size_t i = 0, tl = strlen(tok);
    while (i < n) {
        size_t j, e;
        while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == ','))
            i++;
        j = i;
        while (j < n && s[j] != ',')
            j++;
        e = j;
        while (e > i && (s[e - 1] == ' ' || s[e - 1] == '\t'))
            e--;
        if (e - i == tl && strncasecmp(s + i, tok, tl) == 0) return 1;
        i = j;
    }
    return 0;
}

/* ---- reading a request (http_parser callbacks) ------------------------ */

static int parse_oom(aiorch_h1_req *q)
{
    q->reject = 500;
    return -1;
}

/* The request line and headers are held in scratch: bound them (431). */
static int head_check(aiorch_h1_req *q)
{
    if (q->scratch.len <= q->max_header) return 0;
    q->reject = 431;
    return -1;
}

/* http_parser on_message_begin */
static int on_message_begin(http_parser *p)
{
    aiorch_h1_req *q = p->data;
    q->phase = AIORCH_H1_HEAD;
    q->scratch.len = 0;
    q->body.len = 0;
    q->url_len = 0;
    q->nhdrs = 0;
    q->hstate = 0;
    q->line_done = 0;
    q->reject = 0;
    if (q->on_begin) q->on_begin(q);
    return 0;
}

/* http_parser on_url */
static int on_url(http_parser *p, const char *at, size_t n)
{
    aiorch_h1_req *q = p->data;
    if (aiorch_buf_add(&q->scratch, at, n)) return parse_oom(q);
    q->url_len += n;
    return head_check(q);
}

/* http_parser on_header_field. http_parser (built without strict mode)
 * lets spaces into a name: "Foo : bar" would pass as the header "foo ",
 * and "Content-Length : 5" would not frame the body. A field name is a
 * token (RFC 9112 5.1): 400 otherwise. */
static int on_header_field(http_parser *p, const char *at, size_t n)
{
    aiorch_h1_req *q = p->data;
    aiorch_h1_hdr *h;
    size_t i;

    for (i = 0; i < n; i++)
        if (!aiorch_h1_is_tchar((unsigned char)at[i])) {
            q->reject = 400;
            return -1;
        }
    if (q->hstate != 1) {
        if (q->nhdrs == H1_MAX_HEADERS) {
            q->reject = 400;
            return -1;
        }
        if (q->nhdrs == q->hdrs_cap) {
            size_t cap = q->hdrs_cap ? q->hdrs_cap * 2 : 16;
            aiorch_h1_hdr *nh = realloc(q->hdrs, cap * sizeof *nh);
            if (!nh) return parse_oom(q);
            q->hdrs = nh;
            q->hdrs_cap = cap;
        }
        h = &q->hdrs[q->nhdrs++];
        h->name = h->value = q->scratch.len;
        h->name_len = h->value_len = 0;
        q->hstate = 1;
        q->line_done = 0;
    }
    h = &q->hdrs[q->nhdrs - 1];
    if (aiorch_buf_add(&q->scratch, at, n)) return parse_oom(q);
    h->name_len += n;
    return head_check(q);
}

/* Whether a piece of a header value starts a folded line: only blanks
 * between it and a line end before it (in the bytes http_parser was given). */
static int value_folded(const aiorch_h1_req *q, const char *at)
{
    const char *s = at;
    while (s > q->parse_start && (s[-1] == ' ' || s[-1] == '\t'))
        s--;
    return s > q->parse_start && s[-1] == '\n';
}

/* http_parser on_header_value. http_parser joins an obsolete line fold
 * ("Foo: a\r\n b") to the value; a server must refuse it or replace it
 * (RFC 9112 5.2): 400. A value's piece after its line ended, or right
 * after a line end and blanks, is a fold. (An empty value comes as an
 * empty piece at the start of the next line.) */
static int on_header_value(http_parser *p, const char *at, size_t n)
{
    aiorch_h1_req *q = p->data;
    aiorch_h1_hdr *h;

    if (q->nhdrs == 0) return -1;
    if (n > 0 && ((q->hstate == 2 && q->line_done) || value_folded(q, at))) {
        q->reject = 400;
        return -1;
    }
    h = &q->hdrs[q->nhdrs - 1];
    if (q->hstate != 2) {
        h->value = q->scratch.len;
        q->hstate = 2;
    }
    q->line_done = at + n < q->parse_end && (at[n] == '\r' || at[n] == '\n');
    if (aiorch_buf_add(&q->scratch, at, n)) return parse_oom(q);
    h->value_len += n;
    return head_check(q);
}

static int expects_continue(const aiorch_h1_req *q)
{
    size_t i;
    for (i = 0; i < q->nhdrs; i++) {
        const aiorch_h1_hdr *h = &q->hdrs[i];
        if (aiorch_h1_name_is(q->scratch.p + h->name, h->name_len, "expect") &&
            aiorch_h1_name_is(q->scratch.p + h->value, h->value_len, "100-continue"))
            return 1;
    }
    return 0;
}

/* http_parser on_headers_complete: the owner takes the request (and may
 * answer it), then the body's size is checked before any of it is read. */
static int on_headers_complete(http_parser *p)
{
    aiorch_h1_req *q = p->data;
    int sized = !(p->flags & F_CHUNKED) && p->content_length != ULLONG_MAX;
    int has_body = (p->flags & F_CHUNKED) || (sized && p->content_length > 0);
    int expects = has_body && p->http_major == 1 && p->http_minor >= 1 && expects_continue(q);

    q->phase = AIORCH_H1_BODY;
    if (q->on_head && q->on_head(q) < 0) return -1;
    if (sized && p->content_length > q->max_body) { /* refuse before reading it */
        q->reject = 413;
        return -1;
    }
    if (sized && q->pool && aiorch_pool_full(q->pool, p->content_length)) {
        q->reject = 503; /* max_buffered: it would not fit */
        return -1;
    }
    q->body.ceil = sized ? (size_t)p->content_length : 0; /* grown as it arrives, up to that */
    /* A client waiting for "100 Continue" would otherwise stall. */
    if (expects && q->on_continue && q->on_continue(q) < 0) {
        q->failed = 1;
        return -1;
    }
    return 0;
}

/* http_parser on_body: max_body answers 413, max_buffered 503. */
static int on_body(http_parser *p, const char *at, size_t n)
{
    aiorch_h1_req *q = p->data;
    int rc;
    if (n > q->max_body - q->body.len) {
        q->reject = 413;
        return -1;
    }
    rc = aiorch_buf_add(&q->body, at, n);
    if (rc == AIORCH_BUF_OVER) {
        q->reject = 503;
        return -1;
    }
    if (rc) return parse_oom(q);
    return 0;
}

/* http_parser on_message_complete: pausing leaves pipelined bytes unparsed
 * until the owner asks for more. */
static int on_message_complete(http_parser *p)
{
    ((aiorch_h1_req *)p->data)->phase = AIORCH_H1_IDLE;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings h1_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void aiorch_h1_req_init(aiorch_h1_req *q, aiorch_pool *pool)
{
    http_parser_init(&q->parser, HTTP_REQUEST);
    q->parser.data = q;
    q->pool = pool;
    q->body.pool = pool;
    q->body.capped = 1;
}

void aiorch_h1_req_drop_head(aiorch_h1_req *q)
{
    aiorch_buf_free(&q->scratch);
    free(q->hdrs);
    q->hdrs = NULL;
    q->nhdrs = q->hdrs_cap = 0;
}

void aiorch_h1_req_free(aiorch_h1_req *q)
{
    aiorch_h1_req_drop_head(q);
    aiorch_buf_free(&q->body);
}

size_t aiorch_h1_parse(aiorch_h1_req *q, const char *p, size_t n, int *complete, int *status)
{
    size_t used;
    enum http_errno e;

    *complete = 0;
    *status = 0;
    q->parse_start = p;
    q->parse_end = p + n;
    used = http_parser_execute(&q->parser, &h1_settings, p, n);
    e = HTTP_PARSER_ERRNO(&q->parser);
    if (e == HPE_PAUSED) {
        http_parser_pause(&q->parser, 0);
        *complete = 1;
    } else if (e != HPE_OK) {
        *status = q->reject ? q->reject : e == HPE_HEADER_OVERFLOW ? 431 : 400;
    }
    return used;
}

void aiorch_h1_request(const aiorch_h1_req *q, aiorch_http_request *out, aiorch_header *headers)
{
    const char *sc = q->scratch.p;
    size_t i;
    for (i = 0; i < q->nhdrs; i++) {
        const aiorch_h1_hdr *h = &q->hdrs[i];
        headers[i].name = sc + h->name;
        headers[i].name_len = h->name_len;
        headers[i].value = h->value_len ? sc + h->value : "";
        headers[i].value_len = h->value_len;
    }
    out->method = http_method_str((enum http_method)q->parser.method);
    out->target = q->url_len ? sc : "";
    out->target_len = q->url_len;
    out->headers = headers;
    out->nheaders = q->nhdrs;
}

/* ---- writing a response ------------------------------------------------- */

/* The status line, without printf (it runs for every response). */
static int status_line(aiorch_buf *b, int status)
{
    const char *reason = aiorch_h1_reason(status);
    char num[4];

    if (status < 100 || status > 999) return buf_fmt(b, "HTTP/1.1 %d %s\r\n", status, reason);
    num[0] = (char)('0' + status / 100);
    num[1] = (char)('0' + status / 10 % 10);
    num[2] = (char)('0' + status % 10);
    num[3] = ' ';
    return buf_lit(b, "HTTP/1.1 ") || aiorch_buf_add(b, num, 4) ||
           aiorch_buf_add(b, reason, strlen(reason)) || buf_lit(b, "\r\n");
}

/* A decimal number, without printf. */
static int buf_uint(aiorch_buf *b, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return aiorch_buf_add(b, tmp + i, sizeof tmp - i);
}

/* A body of unknown length goes chunked (HTTP/1.1) or until the
 * connection closes (HTTP/1.0); a HEAD response's has no framing. */
int aiorch_h1_head(aiorch_buf *b, const aiorch_http_response *res, aiorch_h1_frame *f)
{
    size_t mark = b->len - b->off, i;
    int bodyless = res->status < 200 || res->status == 204 || res->status == 304;

    f->chunked = 0;
    if (res->close) f->close = 1;
    if (status_line(b, res->status)) goto fail;
    for (i = 0; i < res->nheaders; i++) {
        const aiorch_header *h = &res->headers[i];
        if (aiorch_buf_add(b, h->name, h->name_len) || buf_lit(b, ": ") ||
            aiorch_buf_add(b, h->value, h->value_len) || buf_lit(b, "\r\n"))
            goto fail;
    }
    if (bodyless) {
        /* no framing at all */
    } else if (res->length >= 0) {
        if (buf_lit(b, "content-length: ") || buf_uint(b, (uint64_t)res->length) ||
            buf_lit(b, "\r\n"))
            goto fail;
    } else if (f->head) {
        /* no body, and its length is not known */
    } else if (!f->http10) {
        if (buf_lit(b, "transfer-encoding: chunked\r\n")) goto fail;
        f->chunked = 1;
    } else {
        f->close = 1; /* HTTP/1.0 has no chunks: the close ends the body */
    }
    if (!f->keep_alive || f->close) {
        f->close = 1;
        if (buf_lit(b, "connection: close\r\n")) goto fail;
    } else if (f->http10) {
        if (buf_lit(b, "connection: keep-alive\r\n")) goto fail;
    }
    if (buf_lit(b, "\r\n")) goto fail;
    return 0;
fail:
    b->len = b->off + mark;
    f->chunked = 0;
    return -1;
}

int aiorch_h1_plain(aiorch_buf *b, int status, const char *type, const char *body, size_t len)
{
    size_t mark = b->len - b->off;
    if (buf_fmt(b,
                "HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %zu\r\n"
                "connection: close\r\n\r\n",
                status, aiorch_h1_reason(status), type, len) ||
        aiorch_buf_add(b, body, len)) {
        b->len = b->off + mark;
        return -1;
    }
    return 0;
}

int aiorch_h1_body(const aiorch_h1_frame *f, const char *data, size_t n, int last,
                   struct iovec *iov, char *hex)
{
    static const char crlf[] = "\r\n", crlf_end[] = "\r\n0\r\n\r\n";
    int k = 0;

    if (f->chunked) {
        if (n) {
            iov[k].iov_base = hex;
            iov[k++].iov_len = (size_t)snprintf(hex, 24, "%zx\r\n", n);
            iov[k].iov_base = (void *)data;
            iov[k++].iov_len = n;
            iov[k].iov_base = (void *)(last ? crlf_end : crlf);
            iov[k++].iov_len = last ? sizeof crlf_end - 1 : sizeof crlf - 1;
        } else if (last) {
            iov[k].iov_base = (void *)(crlf_end + 2);
            iov[k++].iov_len = sizeof crlf_end - 3;
        }
    } else if (n) {
        iov[k].iov_base = (void *)data;
        iov[k++].iov_len = n;
    }
    return k;
}
