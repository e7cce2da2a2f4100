/* Paged attention over rocmforge's cache: the arguments shared by the host
 * version (rf_host_attention.c) and the GPU kernels (kernels/attention.cu),
 * which take this struct by value. Plain C, no Python.
 *
 * Sequence s has n_s query tokens, the last n_s of its seq_lens[s] tokens
 * (their K/V already written): query token i sits at position
 * seq_lens[s] - n_s + i and attends to positions [0, that position] (causal
 * within the chunk). Decode is n_s = 1 for every sequence. A sequence's
 * positions live in its table's blocks: position p is row p % block_size of
 * block table[p / block_size]. fp8/int8 caches hold x / scale; they are read
 * as stored * scale. A sequence of length 0 is padding: its queries get
 * zeros (a fixed-size batch, as a captured graph replays, may hold such rows);
 * any other length must cover its queries. Softmax is computed in float32 with the running maximum
 * (flash attention's online form); the output has the query's element type. */
#ifndef ROCMFORGE_ATTENTION_H
#define ROCMFORGE_ATTENTION_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The GPU kernels' shape: threads per block, and the most positions per split
 * (a sequence's context is cut into splits of `part` positions, each read by
 * its own thread blocks, then combined). */
#define RF_ATTN_THREADS 128
#define RF_ATTN_PART 512

typedef struct rf_attn_args {
    void *out;                  /* [num_queries, num_q_heads, head_dim], q_dt */
    const void *query;          /* [num_queries, num_q_heads, head_dim], q_dt */
    const void *key_cache;      /* [num_blocks, block_size, num_kv_heads, head_dim], cache_dt */
    const void *value_cache;
    const int32_t *tables;      /* dense: [num_seqs, stride], -1 past the used blocks; CSR: indices */
    const int32_t *indptr;      /* CSR: [num_seqs + 1] offsets into tables; NULL: dense */
    const int32_t *seq_lens;    /* [num_seqs]: tokens in the cache, the queries' own included */
    const int32_t *query_start; /* [num_seqs + 1] offsets of each sequence's queries; NULL: one each */
    int64_t num_seqs, num_queries, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks;
    int64_t stride;             /* dense: entries per row */
    int64_t num_indices;        /* CSR: entries of tables */
    int q_dt, cache_dt;
    float k_scale, v_scale;     /* dequantization of fp8/int8 caches; 1 for float caches */
    float scale;                /* softmax scale, usually 1 / sqrt(head_dim) */
    int64_t part;               /* GPU kernels: positions per split, 1..RF_ATTN_PART (the host version ignores it) */
} rf_attn_args;

/* What a bad argument found by the checks is, with the sequence in *bad. */
enum {
    RF_ATTN_OK = 0,
    RF_ATTN_BAD_BLOCK = 2,      /* a table entry a sequence uses lies outside [0, num_blocks) */
    RF_ATTN_BAD_LEN = 5,        /* seq_lens[s] < 0, beyond its table, or below its query count */
    RF_ATTN_BAD_QUERIES = 6,    /* query_start not non-decreasing from 0 to num_queries */
    RF_ATTN_NO_MEMORY = 7       /* the host version could not allocate its scratch */
};

/* Check every sequence's length, queries and used table entries; nothing is
 * computed. The GPU path runs the same checks on host-resident indices. */
int rf_attn_check(const rf_attn_args *a, int64_t *bad);

/* The host version: checks (as rf_attn_check), then computes. */
int rf_host_paged_attention(const rf_attn_args *a, int64_t *bad);

#ifdef __cplusplus
}
#endif
#endif
