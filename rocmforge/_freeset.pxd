# cython: language_level=3
# A shard's free blocks: a bitmap over every block id with summary levels
# (see _rf_freeset.h, where the functions live).

from libc.stdint cimport int32_t, int64_t, uint64_t

from rocmforge._state cimport FreeSet

cdef extern from "_rf_freeset.h" nogil:
    int64_t fs_words(int64_t n)
    void fs_size(FreeSet* f, int32_t n)
    void fs_summarize(FreeSet* f, int32_t n)
    int64_t fs_low_word(FreeSet* f)
    int32_t fs_lowest(FreeSet* f)
    bint fs_has(const FreeSet* f, int32_t b)
    void fs_set(FreeSet* f, int32_t b)
    void fs_set_word(FreeSet* f, int64_t i, uint64_t bits)
    void fs_clear_from(FreeSet* f, int level, int64_t i)
    int32_t fs_pop_lowest(FreeSet* f)
