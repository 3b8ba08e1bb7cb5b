/* run.c: ShardLoom's single-file C99 runner for every ShardLoom model (dense and hybrid).
 *
 *   make c                       (cc -O3 -std=c99 -fopenmp -o c/run c/run.c -lm; OpenMP is optional)
 *   c/run model.bin -i "Once upon a time" -n 128 -T 0.8 -p 0.95 -s 42
 *   c/run model.bin -t 1,450,2040 -n 32 -T 0 -m ids          greedy; print the new ids
 *   c/run model.bin -t 1,450,2040 -m logits -o logits.f32    float32 [T, vocab], one row per position
 *   c/run model.bin -i "some text" -m encode                  the prompt's ids
 *
 * model.bin is written by trainer/export_c.py; its layout is docs/c-format.md. Every position is run
 * one token at a time against the caches: keys/values for attention layers (plus the normed pre-RoPE
 * keys and the compressed block keys/values for CSA layers), the conv tail and the recurrent state for
 * Gated DeltaNet layers. A bad file is one line on stderr and exit status 2.
 */
#define _POSIX_C_SOURCE 199309L
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define VERSION 1
#define HEADER_BYTES 192
#define N_INTS 24
#define N_FLOATS 8
#define MAX_DIM (1 << 24)
#ifndef PAR_MIN /* multiply-adds below which a loop is not worth waking threads for */
#define PAR_MIN (1 << 15)
#endif

enum { FAM_DENSE = 1, FAM_HYBRID = 2 };
enum { MIX_ATTN = 0, MIX_LINEAR = 1, MIX_CSA = 2, MIX_FULL = 3 };
enum { DT_F32 = 0, DT_BF16 = 1 };
enum { PC_NORMAL = 0, PC_SPECIAL = 1, PC_BYTE = 2, PC_HIDDEN = 3 };
enum { TK_NONE = 0, TK_SENTENCEPIECE = 1, TK_BYTELEVEL = 2 };
enum { PT_NONE = 0, PT_GPT2 = 1, PT_CL100K = 2, PT_QWEN2 = 3 };
enum { TF_ADD_BOS = 1, TF_DUMMY_PREFIX = 2, TF_WHOLE_FIRST = 4, TF_PREFIX_SPACE = 8 };

static const char *g_path = "model.bin";

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "run: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

/* ------------------------------------------------------------------------------------ model */

typedef struct {
    int family, vocab, dim, n_layers, n_heads, n_kv, head_dim, ffn, max_seq, rope_dims, rope_interleaved,
        tied, unit_norm, qk_norm, v_norm, sandwich, lin_heads, lin_dim, conv_k, csa_window, csa_block;
    float rope_theta, eps, attn_scale, softcap;
} Config;

typedef struct { int mixer, window, xsa; } LayerSpec;

typedef struct {
    float *norm1, *norm2, *out_norm1, *out_norm2;             /* pre-norms; sandwich output norms */
    float *wq, *wk, *wv, *wo, *q_norm, *k_norm, *v_norm;       /* attention */
    float *compress_k, *compress_v, *blend_gate;              /* CSA */
    float *in_qkv, *in_z, *in_b, *in_a, *conv, *A_log, *dt_bias, *gnorm, *out_proj; /* Gated DeltaNet */
    float *res1, *sub1, *res2, *sub2;                          /* hyper-connection scales */
    float *w_gate, *w_up, *w_down;                             /* SwiGLU */
} Layer;

typedef struct { float *embed, *norm, *head; Layer *layer; } Weights;

typedef struct { float **dst; char name[80]; int ndim, d0, d1; } Slot;
typedef struct { Slot *s; int n, cap; } Plan;

static void add(Plan *p, float **dst, int layer, const char *name, int d0, int d1) {
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 64;
        p->s = realloc(p->s, (size_t)p->cap * sizeof(Slot));
        if (!p->s) die("out of memory");
    }
    Slot *s = &p->s[p->n++];
    s->dst = dst;
    if (layer < 0) snprintf(s->name, sizeof s->name, "%s", name);
    else snprintf(s->name, sizeof s->name, "blocks.%d.%s", layer, name);
    s->ndim = d1 ? 2 : 1;
    s->d0 = d0;
    s->d1 = d1;
}

static void add_swiglu(Plan *p, Layer *L, int i, const char *pre, const Config *c) {
    char n[64];
    snprintf(n, sizeof n, "%s.gate_proj.weight", pre); add(p, &L->w_gate, i, n, c->ffn, c->dim);
    snprintf(n, sizeof n, "%s.up_proj.weight", pre);   add(p, &L->w_up, i, n, c->ffn, c->dim);
    snprintf(n, sizeof n, "%s.down_proj.weight", pre); add(p, &L->w_down, i, n, c->dim, c->ffn);
}

/* Tensor order of the dense family (mirrors trainer/export_c.py's _dense_layer). */
static void plan_dense_layer(Plan *p, Layer *L, int i, const Config *c) {
    int d = c->dim, hd = c->head_dim, q = c->n_heads * hd, kv = c->n_kv * hd;
    add(p, &L->norm1, i, "attn_norm.weight", d, 0);
    add(p, &L->wq, i, "attn.q_proj.weight", q, d);
    add(p, &L->wk, i, "attn.k_proj.weight", kv, d);
    add(p, &L->wv, i, "attn.v_proj.weight", kv, d);
    add(p, &L->wo, i, "attn.o_proj.weight", d, q);
    if (c->qk_norm) { add(p, &L->q_norm, i, "attn.q_norm.weight", hd, 0); add(p, &L->k_norm, i, "attn.k_norm.weight", hd, 0); }
    if (c->v_norm) add(p, &L->v_norm, i, "attn.v_norm.weight", hd, 0);
    if (c->sandwich) add(p, &L->out_norm1, i, "attn_out_norm.weight", d, 0);
    add(p, &L->norm2, i, "mlp_norm.weight", d, 0);
    add_swiglu(p, L, i, "mlp", c);
    if (c->sandwich) add(p, &L->out_norm2, i, "mlp_out_norm.weight", d, 0);
}

/* Tensor order of the hybrid family (mirrors trainer/export_c.py's _hybrid_layer). */
static void plan_hybrid_layer(Plan *p, Layer *L, int i, const Config *c, int mixer) {
    int d = c->dim, hd = c->head_dim, q = c->n_heads * hd, kv = c->n_kv * hd;
    int H = c->lin_heads, inner = c->lin_heads * c->lin_dim;
    add(p, &L->norm1, i, "mixer_norm.weight", d, 0);
    if (mixer == MIX_LINEAR) {
        add(p, &L->in_qkv, i, "mixer.in_proj_qkv.weight", 3 * inner, d);
        add(p, &L->in_z, i, "mixer.in_proj_z.weight", inner, d);
        add(p, &L->in_b, i, "mixer.in_proj_b.weight", H, d);
        add(p, &L->in_a, i, "mixer.in_proj_a.weight", H, d);
        add(p, &L->conv, i, "mixer.conv1d.weight", 3 * inner, c->conv_k);
        add(p, &L->A_log, i, "mixer.A_log", H, 0);
        add(p, &L->dt_bias, i, "mixer.dt_bias", H, 0);
        add(p, &L->gnorm, i, "mixer.norm.weight", c->lin_dim, 0);
        add(p, &L->out_proj, i, "mixer.out_proj.weight", d, inner);
    } else {
        add(p, &L->wq, i, "mixer.wq.weight", 2 * q, d);
        add(p, &L->wk, i, "mixer.wk.weight", kv, d);
        add(p, &L->wv, i, "mixer.wv.weight", kv, d);
        add(p, &L->wo, i, "mixer.wo.weight", d, q);
        add(p, &L->q_norm, i, "mixer.q_norm.weight", hd, 0);
        add(p, &L->k_norm, i, "mixer.k_norm.weight", hd, 0);
        if (mixer == MIX_CSA) {
            add(p, &L->compress_k, i, "mixer.compress_k.weight", kv, kv);
            add(p, &L->compress_v, i, "mixer.compress_v.weight", kv, kv);
            add(p, &L->blend_gate, i, "mixer.blend_gate.weight", q, d);
        }
    }
    add(p, &L->res1, i, "mixer_residual_scale", d, 0);
    add(p, &L->sub1, i, "mixer_sublayer_scale", d, 0);
    add(p, &L->norm2, i, "ffn_norm.weight", d, 0);
    add_swiglu(p, L, i, "ffn", c);
    add(p, &L->res2, i, "ffn_residual_scale", d, 0);
    add(p, &L->sub2, i, "ffn_sublayer_scale", d, 0);
}

static void plan_model(Plan *p, const Config *c, const LayerSpec *ls, Weights *w) {
    add(p, &w->embed, -1, "embed.weight", c->vocab, c->dim);
    for (int i = 0; i < c->n_layers; i++) {
        if (c->family == FAM_DENSE) plan_dense_layer(p, &w->layer[i], i, c);
        else plan_hybrid_layer(p, &w->layer[i], i, c, ls[i].mixer);
    }
    add(p, &w->norm, -1, "norm.weight", c->dim, 0);
    if (!c->tied) add(p, &w->head, -1, "lm_head.weight", c->vocab, c->dim);
}

/* ------------------------------------------------------------------------------- file reading */

static uint32_t u32_at(const unsigned char *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}
static uint64_t u64_at(const unsigned char *b) { return (uint64_t)u32_at(b) | (uint64_t)u32_at(b + 4) << 32; }
static float f32_at(const unsigned char *b) { uint32_t u = u32_at(b); float f; memcpy(&f, &u, 4); return f; }

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: cannot open", path);
    if (fseek(f, 0, SEEK_END) != 0) die("%s: cannot seek", path);
    long n = ftell(f);
    if (n < 0) die("%s: cannot tell its size", path);
    rewind(f);
    unsigned char *buf = malloc((size_t)n ? (size_t)n : 1);
    if (!buf) die("%s: out of memory reading %ld bytes", path, n);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) die("%s: read error", path);
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static void parse_config(const unsigned char *h, Config *c) {
    int v[N_INTS];
    float fl[N_FLOATS];
    for (int i = 0; i < N_INTS; i++) v[i] = (int32_t)u32_at(h + 64 + 4 * i);
    for (int i = 0; i < N_FLOATS; i++) fl[i] = f32_at(h + 64 + 4 * N_INTS + 4 * i);
    c->vocab = v[0]; c->dim = v[1]; c->n_layers = v[2]; c->n_heads = v[3]; c->n_kv = v[4]; c->head_dim = v[5];
    c->ffn = v[6]; c->max_seq = v[7]; c->rope_dims = v[8]; c->rope_interleaved = v[9]; c->tied = v[10];
    c->unit_norm = v[11]; c->qk_norm = v[12]; c->v_norm = v[13]; c->sandwich = v[14]; c->lin_heads = v[15];
    c->lin_dim = v[16]; c->conv_k = v[17]; c->csa_window = v[18]; c->csa_block = v[19];
    c->rope_theta = fl[0]; c->eps = fl[1]; c->attn_scale = fl[2]; c->softcap = fl[3];
}

static void check_dim(const char *name, int v, int lo) {
    if (v < lo || v > MAX_DIM) die("%s: config %s=%d is out of range", g_path, name, v);
}

static void check_config(const Config *c, const LayerSpec *ls) {
    check_dim("vocab_size", c->vocab, 1); check_dim("d_model", c->dim, 1); check_dim("n_heads", c->n_heads, 1);
    check_dim("n_kv_heads", c->n_kv, 1); check_dim("head_dim", c->head_dim, 1); check_dim("ffn_dim", c->ffn, 1);
    if (c->n_heads % c->n_kv) die("%s: config n_heads=%d is not a multiple of n_kv_heads=%d", g_path, c->n_heads, c->n_kv);
    if (c->rope_dims <= 0 || c->rope_dims % 2 || c->rope_dims > c->head_dim)
        die("%s: config rope_dims=%d must be even and in (0, head_dim=%d]", g_path, c->rope_dims, c->head_dim);
    if (!(c->eps > 0) || !(c->rope_theta > 0) || !(c->attn_scale > 0) || !(c->softcap >= 0))
        die("%s: config norm_eps/rope_theta/attn_scale/softcap out of range", g_path);
    int any_linear = 0, any_csa = 0;
    for (int i = 0; i < c->n_layers; i++) {
        int m = ls[i].mixer, ok = c->family == FAM_DENSE ? m == MIX_ATTN : (m >= MIX_LINEAR && m <= MIX_FULL);
        if (!ok) die("%s: layer %d has mixer %d, not one of the %s family", g_path, i, m,
                     c->family == FAM_DENSE ? "dense" : "hybrid");
        if (ls[i].window < 0) die("%s: layer %d has window %d", g_path, i, ls[i].window);
        any_linear |= m == MIX_LINEAR;
        any_csa |= m == MIX_CSA;
    }
    if (any_linear) { check_dim("linear_heads", c->lin_heads, 1); check_dim("linear_head_dim", c->lin_dim, 1);
                      check_dim("linear_conv_kernel", c->conv_k, 1); }
    if (any_csa) { check_dim("csa_window", c->csa_window, 1); check_dim("csa_block", c->csa_block, 1); }
}

static void shape_str(char *out, size_t n, int ndim, uint32_t d0, uint32_t d1) {
    if (ndim == 2) snprintf(out, n, "[%u, %u]", d0, d1);
    else if (ndim == 1) snprintf(out, n, "[%u]", d0);
    else snprintf(out, n, "(%d dims)", ndim);
}

static float *tensor_f32(const unsigned char *src, int dtype, size_t count) {
    float *out = malloc(count * sizeof(float));
    if (!out) die("out of memory (%zu floats)", count);
    for (size_t i = 0; i < count; i++) {
        if (dtype == DT_F32) { out[i] = f32_at(src + 4 * i); continue; }
        uint32_t u = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;
        memcpy(&out[i], &u, 4);
    }
    return out;
}

/* Walk the file's tensor table against the plan the config implies; point every weight at its data. */
static void load_tensors(const unsigned char *buf, size_t size, size_t table_off, int n_tensors, uint64_t data_off,
                         uint64_t data_bytes, const Plan *p) {
    if (n_tensors != p->n) die("%s: the config implies %d tensors, the file lists %d", g_path, p->n, n_tensors);
    uint64_t need = 0;
    for (int i = 0; i < p->n; i++) {
        const unsigned char *t = buf + table_off + 16 * (size_t)i;
        uint32_t dt = u32_at(t), nd = u32_at(t + 4), d0 = u32_at(t + 8), d1 = u32_at(t + 12);
        const Slot *s = &p->s[i];
        if (dt != DT_F32 && dt != DT_BF16) die("%s: tensor %d (%s) has unknown dtype %u", g_path, i, s->name, dt);
        if ((int)nd != s->ndim || (int)d0 != s->d0 || (s->ndim == 2 && (int)d1 != s->d1)) {
            char a[48], b[48];
            shape_str(a, sizeof a, (int)nd, d0, d1);
            shape_str(b, sizeof b, s->ndim, (uint32_t)s->d0, (uint32_t)s->d1);
            die("%s: tensor %d (%s) is %s in the file, the config implies %s", g_path, i, s->name, a, b);
        }
        need += (uint64_t)s->d0 * (uint64_t)(s->ndim == 2 ? s->d1 : 1) * (dt == DT_F32 ? 4 : 2);
    }
    if (need != data_bytes)
        die("%s: the tensor table needs %llu bytes of data, the header says %llu", g_path,
            (unsigned long long)need, (unsigned long long)data_bytes);
    if (data_off > size || data_bytes > size - data_off)
        die("%s: truncated: tensor data needs %llu bytes from offset %llu, the file has %zu bytes", g_path,
            (unsigned long long)data_bytes, (unsigned long long)data_off, size);
    uint64_t off = data_off;
    for (int i = 0; i < p->n; i++) {
        const Slot *s = &p->s[i];
        int dt = (int)u32_at(buf + table_off + 16 * (size_t)i);
        size_t count = (size_t)s->d0 * (size_t)(s->ndim == 2 ? s->d1 : 1);
        if (dt == DT_F32 && off % 4 == 0) *s->dst = (float *)(void *)(buf + off); /* little-endian host */
        else *s->dst = tensor_f32(buf + off, dt, count);
        off += count * (dt == DT_F32 ? 4 : 2);
    }
}

/* ------------------------------------------------------------------------------ tokenizer */

typedef struct { const unsigned char *b; int len, type; float score; } Piece;
typedef struct {
    int n, kind, pretok, bos, eos, flags;
    Piece *p;
    int *sorted, n_sorted;   /* NORMAL pieces ordered by bytes, for lookup */
    int byte_id[256];        /* the piece for each raw byte (-1: none) */
} Tokenizer;

static int piece_cmp(const unsigned char *a, int la, const unsigned char *b, int lb) {
    int m = la < lb ? la : lb, r = memcmp(a, b, (size_t)m);
    return r ? r : la - lb;
}

static const Tokenizer *g_sort_tok;
static int sort_cmp(const void *x, const void *y) {
    const Piece *a = &g_sort_tok->p[*(const int *)x], *b = &g_sort_tok->p[*(const int *)y];
    return piece_cmp(a->b, a->len, b->b, b->len);
}

static int lookup(const Tokenizer *t, const unsigned char *s, int len) {
    int lo = 0, hi = t->n_sorted - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, id = t->sorted[mid];
        int r = piece_cmp(t->p[id].b, t->p[id].len, s, len);
        if (r == 0) return id;
        if (r < 0) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

static void parse_tokenizer(const unsigned char *buf, size_t size, uint64_t off, uint64_t bytes, int vocab,
                            Tokenizer *t) {
    if (off > size || bytes > size - off) die("%s: truncated: the tokenizer section ends past the file", g_path);
    if (bytes < 32 || memcmp(buf + off, "SLTK", 4) != 0) die("%s: tokenizer section has no SLTK magic", g_path);
    const unsigned char *h = buf + off, *end = buf + off + bytes;
    t->n = (int)u32_at(h + 4); t->kind = (int)u32_at(h + 8); t->pretok = (int)u32_at(h + 12);
    t->bos = (int32_t)u32_at(h + 16); t->eos = (int32_t)u32_at(h + 20); t->flags = (int)u32_at(h + 24);
    if (t->n < 0 || t->n > vocab) die("%s: the tokenizer has %d pieces, the model's vocab is %d", g_path, t->n, vocab);
    if (t->kind > TK_BYTELEVEL || t->pretok > PT_QWEN2) die("%s: unknown tokenizer kind %d / pre-tokenizer %d",
                                                          g_path, t->kind, t->pretok);
    if (t->bos >= t->n || t->eos >= t->n) die("%s: tokenizer BOS/EOS id outside its %d pieces", g_path, t->n);
    t->p = xmalloc((size_t)t->n * sizeof(Piece));
    const unsigned char *q = h + 32;
    for (int i = 0; i < t->n; i++) {
        if (end - q < 12) die("%s: truncated: tokenizer piece %d of %d", g_path, i, t->n);
        t->p[i].score = f32_at(q);
        t->p[i].type = (int)u32_at(q + 4);
        uint32_t len = u32_at(q + 8);
        if ((uint64_t)(end - q - 12) < len) die("%s: truncated: tokenizer piece %d of %d", g_path, i, t->n);
        t->p[i].b = q + 12;
        t->p[i].len = (int)len;
        q += 12 + len;
    }
    t->sorted = xmalloc((size_t)t->n * sizeof(int) + 1);
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    for (int i = 0; i < t->n; i++) {
        if (t->p[i].type == PC_NORMAL) t->sorted[t->n_sorted++] = i;
        if (t->p[i].type == PC_BYTE && t->p[i].len == 1) t->byte_id[t->p[i].b[0]] = i;
    }
    g_sort_tok = t;
    qsort(t->sorted, (size_t)t->n_sorted, sizeof(int), sort_cmp);
    if (t->kind == TK_BYTELEVEL)
        for (int b = 0; b < 256; b++) { unsigned char c = (unsigned char)b; t->byte_id[b] = lookup(t, &c, 1); }
}

/* ------------------------------------------------------------------------------ the model file */

typedef struct {
    Config c;
    LayerSpec *ls;
    Weights w;
    Tokenizer tok;
    unsigned char *buf;
} Model;

static void load_model(const char *path, Model *m) {
    size_t size;
    g_path = path;
    m->buf = read_file(path, &size);
    const unsigned char *h = m->buf;
    uint32_t one = 1;
    if (*(unsigned char *)&one != 1) die("big-endian hosts are not supported");
    if (size < 8 || memcmp(h, "SLMC", 4) != 0)
        die("%s: not a ShardLoom C model (no SLMC magic; write one with python -m trainer.export_c)", path);
    if (u32_at(h + 4) != VERSION) die("%s: format version %u, this runner reads version %d", path, u32_at(h + 4), VERSION);
    if (size < HEADER_BYTES) die("%s: truncated: %zu bytes, the header alone is %d", path, size, HEADER_BYTES);
    Config *c = &m->c;
    c->family = (int)u32_at(h + 8);
    if (c->family != FAM_DENSE && c->family != FAM_HYBRID) die("%s: unknown model family %d", path, c->family);
    int n_tensors = (int)u32_at(h + 12);
    uint64_t data_off = u64_at(h + 16), data_bytes = u64_at(h + 24), tok_off = u64_at(h + 32), tok_bytes = u64_at(h + 40);
    parse_config(h, c);
    check_dim("n_layers", c->n_layers, 1);
    if (c->n_layers > 4096 || n_tensors < 0 || n_tensors > 1 << 20) die("%s: implausible layer/tensor counts", path);
    size_t table_off = HEADER_BYTES + 16 * (size_t)c->n_layers;
    if (size < table_off + 16 * (size_t)n_tensors) die("%s: truncated inside the layer records / tensor table", path);
    m->ls = xmalloc((size_t)c->n_layers * sizeof(LayerSpec));
    for (int i = 0; i < c->n_layers; i++) {
        const unsigned char *r = h + HEADER_BYTES + 16 * (size_t)i;
        m->ls[i].mixer = (int32_t)u32_at(r); m->ls[i].window = (int32_t)u32_at(r + 4); m->ls[i].xsa = (int32_t)u32_at(r + 8);
    }
    check_config(c, m->ls);
    m->w.layer = xmalloc((size_t)c->n_layers * sizeof(Layer));
    Plan p = {0};
    plan_model(&p, c, m->ls, &m->w);
    load_tensors(m->buf, size, table_off, n_tensors, data_off, data_bytes, &p);
    free(p.s);
    if (c->tied) m->w.head = m->w.embed;
    if (tok_off != data_off + data_bytes) die("%s: the tokenizer section does not follow the tensor data", path);
    parse_tokenizer(m->buf, size, tok_off, tok_bytes, c->vocab, &m->tok);
    if (tok_off + tok_bytes != size)
        die("%s: %llu bytes after the tokenizer section (a damaged or concatenated file?)", path,
            (unsigned long long)(size - tok_off - tok_bytes));
}

/* ------------------------------------------------------------------------------ run state */

typedef struct {
    float *x, *xb, *mix, *ffo, *hb, *hb2, *q, *qg, *k, *kpre, *v, *ctx, *comp, *blend, *tmp, *logits;
    float *scores, *rc, *rs, *bc, *bs;           /* per-head scores; RoPE cos/sin: position, block */
    float *qkv, *dn_z, *dn_o, *dn_u, *dn_ab;     /* Gated DeltaNet scratch */
    float **kc, **vc, **kp, **bk, **bv, **conv, **ssm; /* per-layer caches */
    int len;                                     /* positions the caches hold */
} State;

static void alloc_state(const Model *m, State *s, int len) {
    const Config *c = &m->c;
    int hd = c->head_dim, q = c->n_heads * hd, kv = c->n_kv * hd, inner = c->lin_heads * c->lin_dim, L = c->n_layers;
    size_t f = sizeof(float);
    s->len = len;
    s->x = xmalloc(c->dim * f); s->xb = xmalloc(c->dim * f); s->mix = xmalloc(c->dim * f); s->ffo = xmalloc(c->dim * f);
    s->hb = xmalloc(c->ffn * f); s->hb2 = xmalloc(c->ffn * f);
    s->q = xmalloc(q * f); s->qg = xmalloc(2 * q * f); s->k = xmalloc(kv * f); s->kpre = xmalloc(kv * f);
    s->v = xmalloc(kv * f); s->ctx = xmalloc(q * f); s->comp = xmalloc(q * f); s->blend = xmalloc(q * f);
    s->tmp = xmalloc(kv * f); s->logits = xmalloc(c->vocab * f);
    s->scores = xmalloc((size_t)c->n_heads * len * f);
    s->rc = xmalloc(c->rope_dims * f); s->rs = xmalloc(c->rope_dims * f);
    s->bc = xmalloc(c->rope_dims * f); s->bs = xmalloc(c->rope_dims * f);
    s->qkv = xmalloc(6 * (size_t)inner * f); s->dn_z = xmalloc(inner * f); s->dn_o = xmalloc(inner * f);
    s->dn_u = xmalloc((size_t)inner * f); s->dn_ab = xmalloc(2 * (size_t)c->lin_heads * f);
    float ***caches[] = {&s->kc, &s->vc, &s->kp, &s->bk, &s->bv, &s->conv, &s->ssm};
    for (int j = 0; j < 7; j++) *caches[j] = xmalloc(L * sizeof(float *));
    for (int i = 0; i < L; i++) {
        int mix = m->ls[i].mixer;
        if (mix == MIX_LINEAR) {
            s->conv[i] = xmalloc(3 * (size_t)inner * (c->conv_k - 1) * f + f);
            s->ssm[i] = xmalloc((size_t)c->lin_heads * c->lin_dim * c->lin_dim * f);
            continue;
        }
        s->kc[i] = xmalloc((size_t)len * kv * f);
        s->vc[i] = xmalloc((size_t)len * kv * f);
        if (mix == MIX_CSA) {
            s->kp[i] = xmalloc((size_t)len * kv * f);
            s->bk[i] = xmalloc(((size_t)len / c->csa_block + 1) * kv * f);
            s->bv[i] = xmalloc(((size_t)len / c->csa_block + 1) * kv * f);
        }
    }
}

/* ------------------------------------------------------------------------------ math */

/* out[n_out] = W[n_out, n_in] @ x: PyTorch's [out, in] row-major weight layout. */
static void matmul(float *out, const float *x, const float *w, int n_in, int n_out) {
    int i;
#pragma omp parallel for private(i) if ((size_t)n_out * n_in >= PAR_MIN)
    for (i = 0; i < n_out; i++) {
        const float *row = w + (size_t)i * n_in;
        float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tail = 0.0f;
        int j = 0;
        for (; j + 8 <= n_in; j += 8)
            for (int u = 0; u < 8; u++) a[u] += row[j + u] * x[j + u];
        for (; j < n_in; j++) tail += row[j] * x[j];
        out[i] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + tail;
    }
}

/* RMSNorm: x * rsqrt(mean(x^2) + eps) * w, or * (1 + w) with unit (w == NULL: no weight). */
static void rmsnorm(float *o, const float *x, const float *w, int n, float eps, int unit) {
    double ss = 0.0;
    for (int j = 0; j < n; j++) ss += (double)x[j] * x[j];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int j = 0; j < n; j++) o[j] = (x[j] * r) * (w ? (unit ? 1.0f + w[j] : w[j]) : 1.0f);
}

static void rmsnorm_heads(float *x, const float *w, int heads, int hd, float eps, int unit) {
    for (int h = 0; h < heads; h++) rmsnorm(x + (size_t)h * hd, x + (size_t)h * hd, w, hd, eps, unit);
}

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static float siluf(float x) { return x * sigmoidf(x); }
static float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static void softmax(float *x, int n) {
    float mx = x[0], sum = 0.0f;
    for (int i = 1; i < n; i++) if (x[i] > mx) mx = x[i];
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* cos/sin of position pos for each rotation pair, computed as PyTorch does in fp32. */
static void rope_table(float *cs, float *sn, int pos, int rd, float theta) {
    for (int i = 0; i < rd / 2; i++) {
        float e = (float)(2 * i) / (float)rd, inv = 1.0f / powf(theta, e), f = (float)pos * inv;
        cs[i] = cosf(f);
        sn[i] = sinf(f);
    }
}

/* Rotate the first rd dims of each head: pairs (i, i + rd/2) ("half") or (2i, 2i + 1) ("interleaved"). */
static void rope(float *x, int heads, int hd, int rd, int interleaved, const float *cs, const float *sn) {
    for (int h = 0; h < heads; h++) {
        float *v = x + (size_t)h * hd;
        for (int i = 0; i < rd / 2; i++) {
            int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + rd / 2;
            float x1 = v[a], x2 = v[b];
            v[a] = x1 * cs[i] - x2 * sn[i];
            v[b] = x2 * cs[i] + x1 * sn[i];
        }
    }
}

/* Softmax attention of one query head over rows t0..t1 of a cache (rows of `stride` floats, this head's
   group at `off`). n == 0 rows gives 0. */
static void attend(float *out, const float *q, const float *kc, const float *vc, size_t stride, size_t off,
                   int t0, int t1, int hd, float scale, float *sc) {
    int n = t1 - t0 + 1;
    memset(out, 0, (size_t)hd * sizeof(float));
    if (n <= 0) return;
    for (int t = t0; t <= t1; t++) {
        const float *k = kc + (size_t)t * stride + off;
        float d = 0.0f;
        for (int j = 0; j < hd; j++) d += q[j] * k[j];
        sc[t - t0] = d * scale;
    }
    softmax(sc, n);
    for (int t = t0; t <= t1; t++) {
        const float *v = vc + (size_t)t * stride + off;
        for (int j = 0; j < hd; j++) out[j] += sc[t - t0] * v[j];
    }
}

/* ------------------------------------------------------------------------------ mixers */

/* Dense attention (Atom/Axiom/Argonne): GQA, optional QK/V-norm, RoPE, window, XSA. s->mix = output. */
static void dense_attention(const Model *m, State *s, int l, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layer[l];
    int hd = c->head_dim, H = c->n_heads, kv = c->n_kv * hd, grp = c->n_heads / c->n_kv, win = m->ls[l].window;
    matmul(s->q, s->xb, L->wq, c->dim, H * hd);
    matmul(s->k, s->xb, L->wk, c->dim, kv);
    matmul(s->v, s->xb, L->wv, c->dim, kv);
    if (c->qk_norm) { rmsnorm_heads(s->q, L->q_norm, H, hd, c->eps, 0); rmsnorm_heads(s->k, L->k_norm, c->n_kv, hd, c->eps, 0); }
    if (c->v_norm) rmsnorm_heads(s->v, L->v_norm, c->n_kv, hd, c->eps, 0);
    rope(s->q, H, hd, c->rope_dims, c->rope_interleaved, s->rc, s->rs);
    rope(s->k, c->n_kv, hd, c->rope_dims, c->rope_interleaved, s->rc, s->rs);
    memcpy(s->kc[l] + (size_t)pos * kv, s->k, kv * sizeof(float));
    memcpy(s->vc[l] + (size_t)pos * kv, s->v, kv * sizeof(float));
    int t0 = win > 0 && pos - win + 1 > 0 ? pos - win + 1 : 0, h;
#pragma omp parallel for private(h) if ((size_t)H * (pos - t0 + 1) * hd >= PAR_MIN)
    for (h = 0; h < H; h++) {
        float *y = s->ctx + (size_t)h * hd;
        attend(y, s->q + (size_t)h * hd, s->kc[l], s->vc[l], kv, (size_t)(h / grp) * hd, t0, pos, hd,
               c->attn_scale, s->scores + (size_t)h * s->len);
        if (m->ls[l].xsa) { /* drop the component along the token's own (group's) value direction */
            const float *vs = s->v + (size_t)(h / grp) * hd;
            float nn = 0.0f, dot = 0.0f;
            for (int j = 0; j < hd; j++) nn += vs[j] * vs[j];
            nn = sqrtf(nn);
            if (nn < 1e-12f) nn = 1e-12f;
            for (int j = 0; j < hd; j++) dot += y[j] * (vs[j] / nn);
            for (int j = 0; j < hd; j++) y[j] -= dot * (vs[j] / nn);
        }
    }
    matmul(s->mix, s->ctx, L->wo, H * hd, c->dim);
}

/* Summarise the CSA block that ends at pos: mean of normed pre-RoPE keys -> compress_k -> RoPE at the
   block centre; mean of values -> compress_v. */
static void csa_close_block(const Model *m, State *s, int l, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layer[l];
    int kv = c->n_kv * c->head_dim, B = c->csa_block, blk = pos / B;
    for (int which = 0; which < 2; which++) {
        const float *src = which ? s->vc[l] : s->kp[l];
        memset(s->tmp, 0, kv * sizeof(float));
        for (int t = blk * B; t < blk * B + B; t++)
            for (int j = 0; j < kv; j++) s->tmp[j] += src[(size_t)t * kv + j];
        for (int j = 0; j < kv; j++) s->tmp[j] /= (float)B;
        float *dst = (which ? s->bv[l] : s->bk[l]) + (size_t)blk * kv;
        matmul(dst, s->tmp, which ? L->compress_v : L->compress_k, kv, kv);
    }
    rope_table(s->bc, s->bs, blk * B + B / 2, c->rope_dims, c->rope_theta);
    rope(s->bk[l] + (size_t)blk * kv, c->n_kv, c->head_dim, c->rope_dims, 0, s->bc, s->bs);
}

/* Llama Think's gated full attention and CSA: wq gives query | gate per head; (1+w) q/k norms; partial
   rotate-half RoPE; CSA blends a windowed local path with attention over compressed blocks. */
static void gated_attention(const Model *m, State *s, int l, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layer[l];
    int hd = c->head_dim, H = c->n_heads, kv = c->n_kv * hd, grp = c->n_heads / c->n_kv;
    int csa = m->ls[l].mixer == MIX_CSA, h;
    matmul(s->qg, s->xb, L->wq, c->dim, 2 * H * hd);
    for (h = 0; h < H; h++) memcpy(s->q + (size_t)h * hd, s->qg + (size_t)h * 2 * hd, hd * sizeof(float));
    matmul(s->kpre, s->xb, L->wk, c->dim, kv);
    matmul(s->v, s->xb, L->wv, c->dim, kv);
    rmsnorm_heads(s->q, L->q_norm, H, hd, c->eps, 1);
    rmsnorm_heads(s->kpre, L->k_norm, c->n_kv, hd, c->eps, 1);
    memcpy(s->k, s->kpre, kv * sizeof(float));
    rope(s->q, H, hd, c->rope_dims, 0, s->rc, s->rs);
    rope(s->k, c->n_kv, hd, c->rope_dims, 0, s->rc, s->rs);
    memcpy(s->kc[l] + (size_t)pos * kv, s->k, kv * sizeof(float));
    memcpy(s->vc[l] + (size_t)pos * kv, s->v, kv * sizeof(float));
    int t0 = 0, n_blocks = 0;
    if (csa) {
        memcpy(s->kp[l] + (size_t)pos * kv, s->kpre, kv * sizeof(float));
        if ((pos + 1) % c->csa_block == 0) csa_close_block(m, s, l, pos);
        n_blocks = pos / c->csa_block; /* blocks complete before this query */
        t0 = pos - c->csa_window + 1 > 0 ? pos - c->csa_window + 1 : 0;
        matmul(s->blend, s->xb, L->blend_gate, c->dim, H * hd);
    }
#pragma omp parallel for private(h) if ((size_t)H * (pos - t0 + 1 + n_blocks) * hd >= PAR_MIN)
    for (h = 0; h < H; h++) {
        float *y = s->ctx + (size_t)h * hd, *sc = s->scores + (size_t)h * s->len;
        const float *q = s->q + (size_t)h * hd, *gate = s->qg + (size_t)h * 2 * hd + hd;
        size_t off = (size_t)(h / grp) * hd;
        attend(y, q, s->kc[l], s->vc[l], kv, off, t0, pos, hd, c->attn_scale, sc);
        if (csa) {
            float *cp = s->comp + (size_t)h * hd, *b = s->blend + (size_t)h * hd;
            attend(cp, q, s->bk[l], s->bv[l], kv, off, 0, n_blocks - 1, hd, c->attn_scale, sc);
            for (int j = 0; j < hd; j++) {
                float g = sigmoidf(b[j]);
                y[j] = g * cp[j] + (1.0f - g) * y[j];
            }
        }
        for (int j = 0; j < hd; j++) y[j] *= sigmoidf(gate[j]);
    }
    matmul(s->mix, s->ctx, L->wo, H * hd, c->dim);
}

/* Gated DeltaNet, one token: causal depthwise conv + SiLU on q|k|v, l2-normed q/k, then per head
   S <- e^g S; u = S^T k; S <- S + k (beta (v - u))^T; o = S^T q / sqrt(d); gated RMSNorm; out_proj. */
static void gated_deltanet(const Model *m, State *s, int l) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layer[l];
    int H = c->lin_heads, D = c->lin_dim, inner = H * D, C = 3 * inner, K = c->conv_k, h;
    float *raw = s->qkv, *qkv = s->qkv + C, *tail = s->conv[l];
    matmul(raw, s->xb, L->in_qkv, c->dim, C);
    for (int ch = 0; ch < C; ch++) { /* the tail holds this channel's last K-1 inputs, oldest first */
        const float *w = L->conv + (size_t)ch * K;
        float *t = tail + (size_t)ch * (K - 1), in = raw[ch], acc = w[K - 1] * in;
        for (int j = 0; j < K - 1; j++) acc += w[j] * t[j];
        for (int j = 0; j + 1 < K - 1; j++) t[j] = t[j + 1];
        if (K > 1) t[K - 2] = in;
        qkv[ch] = siluf(acc);
    }
    matmul(s->dn_z, s->xb, L->in_z, c->dim, inner);
    matmul(s->dn_ab, s->xb, L->in_b, c->dim, H);
    matmul(s->dn_ab + H, s->xb, L->in_a, c->dim, H);
#pragma omp parallel for private(h) if ((size_t)H * D * D >= PAR_MIN)
    for (h = 0; h < H; h++) {
        float *q = qkv + (size_t)h * D, *k = qkv + inner + (size_t)h * D, *v = qkv + 2 * inner + (size_t)h * D;
        float *S = s->ssm[l] + (size_t)h * D * D, *u = s->dn_u + (size_t)h * D, *o = s->dn_o + (size_t)h * D;
        float qq = 0.0f, kk = 0.0f;
        for (int j = 0; j < D; j++) { qq += q[j] * q[j]; kk += k[j] * k[j]; }
        float rq = 1.0f / sqrtf(qq + 1e-6f), rk = 1.0f / sqrtf(kk + 1e-6f), scale = 1.0f / sqrtf((float)D);
        for (int j = 0; j < D; j++) { q[j] = q[j] * rq * scale; k[j] = k[j] * rk; }
        float beta = sigmoidf(s->dn_ab[h]);
        float decay = expf(-expf(L->A_log[h]) * softplusf(s->dn_ab[H + h] + L->dt_bias[h]));
        for (int j = 0; j < D * D; j++) S[j] *= decay;
        for (int j = 0; j < D; j++) u[j] = 0.0f;
        for (int a = 0; a < D; a++) for (int b = 0; b < D; b++) u[b] += S[(size_t)a * D + b] * k[a];
        for (int b = 0; b < D; b++) u[b] = beta * (v[b] - u[b]);
        for (int a = 0; a < D; a++) for (int b = 0; b < D; b++) S[(size_t)a * D + b] += k[a] * u[b];
        for (int b = 0; b < D; b++) o[b] = 0.0f;
        for (int a = 0; a < D; a++) for (int b = 0; b < D; b++) o[b] += S[(size_t)a * D + b] * q[a];
        rmsnorm(o, o, L->gnorm, D, c->eps, 0);
        for (int b = 0; b < D; b++) o[b] *= siluf(s->dn_z[(size_t)h * D + b]);
    }
    matmul(s->mix, s->dn_o, L->out_proj, inner, c->dim);
}

static void swiglu(const Model *m, State *s, const Layer *L) {
    const Config *c = &m->c;
    matmul(s->hb, s->xb, L->w_gate, c->dim, c->ffn);
    matmul(s->hb2, s->xb, L->w_up, c->dim, c->ffn);
    for (int j = 0; j < c->ffn; j++) s->hb[j] = siluf(s->hb[j]) * s->hb2[j];
    matmul(s->ffo, s->hb, L->w_down, c->ffn, c->dim);
}

static void block(const Model *m, State *s, int l, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layer[l];
    int d = c->dim, mix = m->ls[l].mixer;
    rmsnorm(s->xb, s->x, L->norm1, d, c->eps, c->unit_norm);
    if (mix == MIX_ATTN) dense_attention(m, s, l, pos);
    else if (mix == MIX_LINEAR) gated_deltanet(m, s, l);
    else gated_attention(m, s, l, pos);
    if (L->out_norm1) rmsnorm(s->mix, s->mix, L->out_norm1, d, c->eps, c->unit_norm);
    for (int j = 0; j < d; j++)  /* hybrid: h = (1 + r) x + (1 + s) mixer; dense: h = x + mixer */
        s->x[j] = L->res1 ? (1.0f + L->res1[j]) * s->x[j] + (1.0f + L->sub1[j]) * s->mix[j] : s->x[j] + s->mix[j];
    rmsnorm(s->xb, s->x, L->norm2, d, c->eps, c->unit_norm);
    swiglu(m, s, L);
    if (L->out_norm2) rmsnorm(s->ffo, s->ffo, L->out_norm2, d, c->eps, c->unit_norm);
    for (int j = 0; j < d; j++)
        s->x[j] = L->res2 ? (1.0f + L->res2[j]) * s->x[j] + (1.0f + L->sub2[j]) * s->ffo[j] : s->x[j] + s->ffo[j];
}

/* One token at position pos through every layer; returns the logits (fp32, softcapped if configured). */
static float *forward(const Model *m, State *s, int token, int pos) {
    const Config *c = &m->c;
    if (pos >= s->len) die("position %d is past the %d the caches hold", pos, s->len);
    memcpy(s->x, m->w.embed + (size_t)token * c->dim, c->dim * sizeof(float));
    rope_table(s->rc, s->rs, pos, c->rope_dims, c->rope_theta);
    for (int l = 0; l < c->n_layers; l++) block(m, s, l, pos);
    rmsnorm(s->x, s->x, m->w.norm, c->dim, c->eps, c->unit_norm);
    matmul(s->logits, s->x, m->w.head, c->dim, c->vocab);
    if (c->softcap > 0)
        for (int i = 0; i < c->vocab; i++) s->logits[i] = c->softcap * tanhf(s->logits[i] / c->softcap);
    return s->logits;
}

/* ------------------------------------------------------------------------------ encoding */

enum { CL_L, CL_N, CL_S, CL_P };

/* UTF-8 code point at s[i] (an invalid or cut sequence: the byte stands for itself, length 1). */
static int cp_at(const unsigned char *s, size_t i, size_t n, int *len) {
    unsigned char b = s[i];
    int need = b >= 0xF8 ? 0 : b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : 0, cp = b & (0x3F >> need);
    *len = 1;
    if (!need || i + (size_t)need >= n) return b;
    for (int k = 1; k <= need; k++) {
        if ((s[i + k] & 0xC0) != 0x80) return b;
        cp = cp << 6 | (s[i + k] & 0x3F);
    }
    *len = need + 1;
    return cp;
}

/* \p{L} / \p{N} / \s / other. Exact for ASCII; for the rest, the common spaces, digits, punctuation and
   symbol blocks are listed and every other code point counts as a letter (docs/c-format.md). */
static int cls(int cp) {
    if (cp < 128) {
        if (isalpha(cp)) return CL_L;
        if (isdigit(cp)) return CL_N;
        return cp == ' ' || (cp >= 9 && cp <= 13) ? CL_S : CL_P;
    }
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
        cp == 0x202F || cp == 0x205F || cp == 0x3000) return CL_S;
    if (cp == 0xB2 || cp == 0xB3 || cp == 0xB9 || (cp >= 0xBC && cp <= 0xBE) || (cp >= 0x660 && cp <= 0x669) ||
        (cp >= 0x6F0 && cp <= 0x6F9) || (cp >= 0x966 && cp <= 0x96F) || (cp >= 0x2150 && cp <= 0x2189) ||
        (cp >= 0x2460 && cp <= 0x249B) || (cp >= 0xFF10 && cp <= 0xFF19) || cp == 0x2070 ||
        (cp >= 0x2074 && cp <= 0x2079) || (cp >= 0x2080 && cp <= 0x2089)) return CL_N;
    if ((cp < 0xC0 && cp != 0xAA && cp != 0xB5 && cp != 0xBA) || cp == 0xD7 || cp == 0xF7 ||
        (cp >= 0x300 && cp <= 0x36F) || (cp >= 0x200B && cp <= 0x2027) || (cp >= 0x2030 && cp <= 0x205E) ||
        (cp >= 0x20A0 && cp <= 0x20FF) || (cp >= 0x2190 && cp <= 0x245F) || (cp >= 0x2500 && cp <= 0x2BFF) ||
        (cp >= 0x3001 && cp <= 0x3004) || (cp >= 0x3008 && cp <= 0x3020) || (cp >= 0xFE00 && cp <= 0xFE0F) ||
        (cp >= 0xFF01 && cp <= 0xFF0F) || (cp >= 0xFF1A && cp <= 0xFF20) || (cp >= 0xFF3B && cp <= 0xFF40) ||
        (cp >= 0xFF5B && cp <= 0xFF65) || (cp >= 0x1F000 && cp <= 0x1FAFF) || (cp >= 0xE0000 && cp <= 0xE007F))
        return CL_P;
    return CL_L;
}

static int cls_at(const unsigned char *s, size_t i, size_t n) { int l; return i < n ? cls(cp_at(s, i, n, &l)) : -1; }

static size_t run_of(const unsigned char *s, size_t i, size_t n, int k) {
    int l;
    while (i < n && cls(cp_at(s, i, n, &l)) == k) i += (size_t)l;
    return i;
}

/* 's 't 're 've 'm 'll 'd (case-insensitively for cl100k/Qwen2): the end, or i for no match. */
static size_t contraction(const unsigned char *s, size_t i, size_t n, int icase) {
    if (s[i] != '\'' || i + 1 >= n) return i;
    int a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
    if (icase) { a = tolower(a); b = tolower(b); }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i + 3;
    return i;
}

/* Whitespace at i (run ends at e): \s+(?!\S) keeps the last space for the next word; else the run. */
static size_t space_run(const unsigned char *s, size_t i, size_t e, size_t n) {
    if (e == n) return e;
    size_t last = i, j = i;
    int l;
    while (j < e) { last = j; cp_at(s, j, n, &l); j += (size_t)l; }
    return last > i ? last : e;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t pre_gpt2(const unsigned char *s, size_t i, size_t n) {
    size_t j = contraction(s, i, n, 0);
    if (j > i) return j;
    int k0 = cls_at(s, i, n), k1 = cls_at(s, i + 1, n);
    if (s[i] == ' ' && k1 >= 0 && k1 != CL_S) return run_of(s, i + 1, n, k1);
    if (k0 != CL_S) return run_of(s, i, n, k0);
    return space_run(s, i, run_of(s, i, n, CL_S), n);
}

/* cl100k: '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$
           |\s*[\r\n]|\s+(?!\S)|\s
   Qwen2:  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+
           |\s+(?!\S)|\s+          (the same but for single digits and no \s++$) */
static size_t pre_cl100k(const unsigned char *s, size_t i, size_t n, int qwen) {
    size_t j = contraction(s, i, n, 1);
    if (j > i) return j;
    int l0, k0 = cls(cp_at(s, i, n, &l0)), crlf = s[i] == '\r' || s[i] == '\n';
    if (k0 == CL_L) return run_of(s, i, n, CL_L);
    if (k0 != CL_N && !crlf && cls_at(s, i + (size_t)l0, n) == CL_L) return run_of(s, i + (size_t)l0, n, CL_L);
    if (k0 == CL_N) {
        int l;
        for (int d = 0, max = qwen ? 1 : 3; d < max && i < n && cls(cp_at(s, i, n, &l)) == CL_N; d++) i += (size_t)l;
        return i;
    }
    j = s[i] == ' ' && cls_at(s, i + 1, n) == CL_P ? i + 1 : i;
    if (cls_at(s, j, n) == CL_P) {
        j = run_of(s, j, n, CL_P);
        while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
        return j;
    }
    size_t e = run_of(s, i, n, CL_S), last_nl = i;
    if (!qwen && e == n) return n;
    for (j = i; j < e; j++) if (s[j] == '\r' || s[j] == '\n') last_nl = j + 1;
    if (last_nl > i) return last_nl;
    return space_run(s, i, e, n);
}

/* The piece that joining ids[i] and ids[i + 1] makes (-1: none; byte-fallback symbols never merge). */
static int pair_id(const Tokenizer *t, const int *ids, int i, unsigned char *buf) {
    const Piece *a = &t->p[ids[i]], *b = &t->p[ids[i + 1]];
    if (a->type != PC_NORMAL || b->type != PC_NORMAL) return -1;
    memcpy(buf, a->b, (size_t)a->len);
    memcpy(buf + a->len, b->b, (size_t)b->len);
    return lookup(t, buf, a->len + b->len);
}

/* Merge-by-score BPE: repeatedly join the adjacent pair whose concatenation is the best-scoring piece
   (leftmost on ties). Each pair's piece is cached; a merge only changes its two neighbours' pairs. */
static int bpe_merge(const Tokenizer *t, int *ids, int n, unsigned char *buf) {
    if (n < 2) return n;
    int *pair = xmalloc((size_t)n * sizeof(int));
    for (int i = 0; i + 1 < n; i++) pair[i] = pair_id(t, ids, i, buf);
    for (;;) {
        int at = -1;
        for (int i = 0; i + 1 < n; i++)
            if (pair[i] >= 0 && (at < 0 || t->p[pair[i]].score > t->p[pair[at]].score)) at = i;
        if (at < 0) break;
        ids[at] = pair[at];
        memmove(ids + at + 1, ids + at + 2, (size_t)(n - at - 2) * sizeof(int));
        if (n - at - 3 > 0) memmove(pair + at + 1, pair + at + 2, (size_t)(n - at - 3) * sizeof(int));
        n--;
        if (at > 0) pair[at - 1] = pair_id(t, ids, at - 1, buf);
        if (at + 1 < n) pair[at] = pair_id(t, ids, at, buf);
    }
    free(pair);
    return n;
}

static int encode_bytes(const Tokenizer *t, const unsigned char *s, size_t n, int *out, unsigned char *buf) {
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        if (t->byte_id[s[i]] < 0) die("%s: the tokenizer has no piece for byte 0x%02x", g_path, s[i]);
        out[k++] = t->byte_id[s[i]];
    }
    return bpe_merge(t, out, k, buf);
}

static int encode_sentencepiece(const Tokenizer *t, const unsigned char *s, size_t n, int *out, unsigned char *buf) {
    int k = 0, l;
    for (size_t i = 0; i < n; i += (size_t)l) {
        cp_at(s, i, n, &l);
        int id = lookup(t, s + i, l);
        if (id >= 0) { out[k++] = id; continue; }
        for (int b = 0; b < l; b++) {  /* byte fallback, or <unk> when the model has no byte pieces */
            int bid = t->byte_id[s[i + b]];
            if (bid < 0) die("%s: no piece for the text's byte 0x%02x and no byte fallback", g_path, s[i + b]);
            out[k++] = bid;
        }
    }
    return bpe_merge(t, out, k, buf);
}

/* Text -> ids (BOS first when the tokenizer's convention asks for it). out holds strlen + 2 ids. */
static int encode(const Tokenizer *t, const char *text, int *out) {
    size_t n = strlen(text);
    int k = 0;
    if (t->kind == TK_NONE) die("%s: the file's tokenizer cannot encode text here; pass ids with -t", g_path);
    if ((t->flags & TF_ADD_BOS) && t->bos >= 0) out[k++] = t->bos;
    unsigned char *s = xmalloc(n + 2), *buf = xmalloc(2 * n + 8);
    size_t len = 0;
    int pre_space = (t->kind == TK_SENTENCEPIECE && (t->flags & TF_DUMMY_PREFIX) && n) ||
                    ((t->flags & TF_PREFIX_SPACE) && n && text[0] != ' ');
    if (pre_space) s[len++] = ' ';
    memcpy(s + len, text, n);
    len += n;
    if (t->kind == TK_SENTENCEPIECE) k += encode_sentencepiece(t, s, len, out + k, buf);
    else
        for (size_t i = 0, j; i < len; i = j) {
            j = t->pretok == PT_GPT2 ? pre_gpt2(s, i, len) : pre_cl100k(s, i, len, t->pretok == PT_QWEN2);
            int whole = (t->flags & TF_WHOLE_FIRST) ? lookup(t, s + i, (int)(j - i)) : -1;
            if (whole >= 0) out[k++] = whole;
            else k += encode_bytes(t, s + i, j - i, out + k, buf);
        }
    if (k == 0 && t->eos >= 0) out[k++] = t->eos;  /* an empty prompt starts at a document boundary */
    free(s);
    free(buf);
    return k;
}

static void print_piece(const Tokenizer *t, int prev, int id) {
    if (id < 0 || id >= t->n) { printf("<%d>", id); return; }
    const Piece *p = &t->p[id];
    if (p->type == PC_HIDDEN) return;
    const unsigned char *b = p->b;
    int len = p->len;
    if (t->kind == TK_SENTENCEPIECE && prev == t->bos && len && b[0] == ' ') { b++; len--; } /* dummy prefix */
    fwrite(b, 1, (size_t)len, stdout);
}

/* ------------------------------------------------------------------------------ sampling */

static uint64_t g_rng = 0x853c49e6748fea9bULL;
static uint32_t rng_u32(void) { /* xorshift64* */
    g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
    return (uint32_t)((g_rng * 0x2545F4914F6CDD1DULL) >> 32);
}
static float rng_f32(void) { return (float)(rng_u32() >> 8) / 16777216.0f; }

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

typedef struct { float p; int i; } ProbIndex;
static int by_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->p, pb = ((const ProbIndex *)b)->p;
    return pa > pb ? -1 : pa < pb ? 1 : 0;
}

/* temperature 0: argmax. Else softmax(logits / T); with top_p < 1 only the smallest most-likely set whose
   mass reaches top_p (always one token at least), as trainer.generate's top_p_filter keeps. */
static int sample(float *logits, int n, float temp, float top_p, ProbIndex *work) {
    if (temp == 0.0f) return argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= temp;
    softmax(logits, n);
    float r = rng_f32();
    if (top_p >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < n; i++) { cdf += logits[i]; if (r < cdf) return i; }
        return n - 1;
    }
    /* a token below (1 - top_p) / (n - 1) cannot be in the nucleus: sort only the rest */
    float cutoff = n > 1 ? (1.0f - top_p) / (float)(n - 1) : 0.0f, mass = 0.0f;
    int m = 0, keep = 0;
    for (int i = 0; i < n; i++) if (logits[i] >= cutoff) { work[m].p = logits[i]; work[m].i = i; m++; }
    qsort(work, (size_t)m, sizeof(ProbIndex), by_prob_desc);
    while (keep < m && (keep == 0 || mass < top_p)) mass += work[keep++].p;
    float cdf = 0.0f;
    r *= mass;
    for (int i = 0; i < keep; i++) { cdf += work[i].p; if (r < cdf) return work[i].i; }
    return work[keep - 1].i;
}

/* ------------------------------------------------------------------------------ main */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void usage(void) {
    fprintf(stderr,
            "usage: run model.bin [options]\n"
            "  -i TEXT   prompt text (encoded with the file's tokenizer)\n"
            "  -t IDS    prompt token ids, comma or space separated\n"
            "  -n N      new tokens to generate (default 256)\n"
            "  -T TEMP   temperature (default 0.8; 0 = greedy)\n"
            "  -p P      top-p nucleus mass (default 1 = off)\n"
            "  -s SEED   random seed (default: the time)\n"
            "  -m MODE   generate (text; default) | ids (the new ids) | logits (with -o) | encode (prompt ids)\n"
            "  -o FILE   -m logits: float32 [prompt length, vocab] logits, one row per position\n"
            "  -j N      threads (OpenMP builds)\n"
            "  -E        do not stop at the tokenizer's EOS\n");
    exit(2);
}

static int parse_ids(const char *arg, int *out, int cap, int vocab) {
    int n = 0;
    const char *p = arg;
    while (*p) {
        while (*p == ',' || *p == ' ' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) die("-t: '%s' is not a list of token ids", arg);
        if (v < 0 || v >= vocab) die("-t: token id %ld is outside the vocabulary [0, %d)", v, vocab);
        if (n == cap) die("-t: too many ids");
        out[n++] = (int)v;
        p = end;
    }
    return n;
}

static void write_logits(const char *path, const Model *m, State *s, const int *ids, int n) {
    FILE *f = fopen(path, "wb");
    if (!f) die("%s: cannot write", path);
    for (int pos = 0; pos < n; pos++) {
        float *lg = forward(m, s, ids[pos], pos);
        if (fwrite(lg, sizeof(float), (size_t)m->c.vocab, f) != (size_t)m->c.vocab) die("%s: write error", path);
    }
    if (fclose(f) != 0) die("%s: write error", path);
}

typedef struct { const char *path, *text, *ids, *mode, *out; int steps, threads, no_stop; float temp, top_p;
                 unsigned long long seed; } Args;

static Args parse_args(int argc, char **argv) {
    Args a = {0};
    a.mode = "generate"; a.steps = 256; a.temp = 0.8f; a.top_p = 1.0f; a.seed = (unsigned long long)time(NULL);
    if (argc < 2 || argv[1][0] == '-') usage();
    a.path = argv[1];
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "-E")) { a.no_stop = 1; continue; }
        if (argv[i][0] != '-' || strlen(argv[i]) != 2 || i + 1 >= argc) usage();
        const char *v = argv[++i];
        switch (argv[i - 1][1]) {
        case 'i': a.text = v; break;
        case 't': a.ids = v; break;
        case 'n': a.steps = atoi(v); break;
        case 'T': a.temp = (float)atof(v); break;
        case 'p': a.top_p = (float)atof(v); break;
        case 's': a.seed = strtoull(v, NULL, 10); break;
        case 'm': a.mode = v; break;
        case 'o': a.out = v; break;
        case 'j': a.threads = atoi(v); break;
        default: usage();
        }
    }
    if (a.steps < 0 || a.temp < 0 || !(a.top_p > 0 && a.top_p <= 1)) die("-n, -T must be >= 0 and -p in (0, 1]");
    if (strcmp(a.mode, "generate") && strcmp(a.mode, "ids") && strcmp(a.mode, "logits") && strcmp(a.mode, "encode"))
        die("-m: unknown mode '%s' (generate, ids, logits, encode)", a.mode);
    if (!a.text == !a.ids) die("give the prompt as exactly one of -i TEXT or -t IDS");
    return a;
}

/* Prompt then new tokens, one forward per position; prints text (or ids) and timing on stderr. */
static void generate(const Model *m, State *s, const int *ids, int n_prompt, const Args *a) {
    const Tokenizer *t = &m->tok;
    int print_ids = !strcmp(a->mode, "ids"), token = ids[0], n_new = 0;
    ProbIndex *work = xmalloc((size_t)m->c.vocab * sizeof(ProbIndex));
    double t0 = now_s(), t_first = 0.0, t_last = 0.0;
    clock_t c_first = 0, c_last = 0; /* process CPU time: robust to neighbours on a shared machine */
    if (!print_ids) for (int i = 0; i < n_prompt; i++) print_piece(t, i ? ids[i - 1] : -1, ids[i]);
    for (int pos = 0; n_new < a->steps; pos++) {
        float *lg = forward(m, s, token, pos);
        if (pos < n_prompt - 1) { token = ids[pos + 1]; continue; }
        int next = sample(lg, m->c.vocab, a->temp, a->top_p, work);
        if (!a->no_stop && next == t->eos && t->eos >= 0) break;
        if (print_ids) printf(n_new ? " %d" : "%d", next);
        else print_piece(t, token, next);
        fflush(stdout);
        t_last = now_s();
        c_last = clock();
        if (n_new++ == 0) { t_first = t_last; c_first = c_last; }
        token = next;
    }
    printf("\n");
    double total = now_s() - t0;
    double cpu = (double)(c_last - c_first) / CLOCKS_PER_SEC;
    fprintf(stderr, "[prompt %d tokens, %d new in %.3f s; decode %.2f tok/s, %.2f tok per CPU-s]\n", n_prompt, n_new,
            total, n_new > 1 ? (n_new - 1) / (t_last - t_first) : 0.0, n_new > 1 && cpu > 0 ? (n_new - 1) / cpu : 0.0);
    free(work);
}

int main(int argc, char **argv) {
    Args a = parse_args(argc, argv);
    Model m;
    memset(&m, 0, sizeof m);
    load_model(a.path, &m);
#ifdef _OPENMP
    if (a.threads > 0) omp_set_num_threads(a.threads);
#endif
    g_rng ^= a.seed * 0x9E3779B97F4A7C15ULL;
    if (!g_rng) g_rng = 1;
    size_t cap = a.text ? strlen(a.text) + 3 : strlen(a.ids) + 1;
    int *ids = xmalloc(cap * sizeof(int)), n;
    n = a.text ? encode(&m.tok, a.text, ids) : parse_ids(a.ids, ids, (int)cap, m.c.vocab);
    if (n == 0) die("the prompt has no tokens");
    if (!strcmp(a.mode, "encode")) {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        return 0;
    }
    State s;
    memset(&s, 0, sizeof s);
    if (!strcmp(a.mode, "logits")) {
        if (!a.out) die("-m logits needs -o FILE");
        alloc_state(&m, &s, n);
        write_logits(a.out, &m, &s, ids, n);
        return 0;
    }
    alloc_state(&m, &s, n + a.steps);
    generate(&m, &s, ids, n, &a);
    return 0;
}
