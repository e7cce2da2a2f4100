/* rocmforge's GPU runtime layer: no Python here.
 *
 * Loads a GPU runtime at run time: HIP's libamdhip64 first, else the CUDA
 * driver (libcuda.so.1), whose API has the same shape; one function table
 * serves both. Every call returns a status code; RF_RT_RUNTIME means the
 * runtime itself failed and rf_rt_last_error() holds its code and message
 * (per thread). Nothing here aborts or prints. */
#ifndef ROCMFORGE_RUNTIME_H
#define ROCMFORGE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { RF_BACKEND_HOST = 0, RF_BACKEND_HIP = 1, RF_BACKEND_CUDA = 2 } rf_backend;

enum {
    RF_RT_OK = 0,
    RF_RT_NO_RUNTIME = 1,       /* library not found */
    RF_RT_MISSING_SYMBOL = 2,   /* library lacks a symbol (named in the load message) */
    RF_RT_NO_DEVICE = 3,        /* runtime present, no usable device */
    RF_RT_RUNTIME = 4,          /* the runtime returned an error: rf_rt_last_error */
    RF_RT_BAD_DEVICE = 5,       /* device index out of range */
    RF_RT_NOT_LOADED = 6,       /* no GPU runtime is loaded (host backend) */
    RF_RT_NOT_READY = 7         /* an event's work has not finished yet */
};

/* Load a runtime: want = -1 tries HIP then CUDA; RF_BACKEND_HIP or
 * RF_BACKEND_CUDA tries only that one; RF_BACKEND_HOST loads nothing.
 * Writes why the chosen backend was picked (or why GPUs are unavailable)
 * to msg. Safe to call again: a loaded runtime stays loaded. */
int rf_rt_load(int want, char *msg, size_t cap);
rf_backend rf_rt_backend(void);

int rf_rt_device_count(int *count);
/* arch: "sm_90" on CUDA; empty on HIP (ROCm 5 exposes no arch attribute in
 * this API). Memory in bytes. */
int rf_rt_device_info(int dev, char *name, size_t name_cap, char *arch, size_t arch_cap,
                      size_t *total_bytes, size_t *free_bytes);

int rf_rt_malloc(int dev, size_t bytes, uint64_t *ptr);
int rf_rt_free(int dev, uint64_t ptr);
/* Page-locked (pinned) host memory, registered with dev's context and usable by all. */
int rf_rt_host_alloc(int dev, size_t bytes, void **ptr);
int rf_rt_host_free(int dev, void *ptr);
int rf_rt_memset(int dev, uint64_t ptr, unsigned char value, size_t bytes);
int rf_rt_copy_htod(int dev, uint64_t dst, const void *src, size_t bytes);
int rf_rt_copy_dtoh(int dev, void *dst, uint64_t src, size_t bytes);
int rf_rt_copy_dtod(int dev, uint64_t dst, uint64_t src, size_t bytes);
int rf_rt_synchronize(int dev);

/* Stream-ordered forms: stream is the runtime's stream handle (NULL: the
 * default stream). Host memory that is not page-locked makes the copies
 * synchronous with the host, as the runtimes document. */
int rf_rt_memset_async(int dev, uint64_t ptr, unsigned char value, size_t bytes, void *stream);
int rf_rt_copy_htod_async(int dev, uint64_t dst, const void *src, size_t bytes, void *stream);
int rf_rt_copy_dtoh_async(int dev, void *dst, uint64_t src, size_t bytes, void *stream);
int rf_rt_copy_dtod_async(int dev, uint64_t dst, uint64_t src, size_t bytes, void *stream);
int rf_rt_stream_synchronize(int dev, void *stream);

/* Streams of rocmforge's own (non-blocking: they do not wait for the default
 * stream, so events order them), and events without timing. rf_rt_stream_wait
 * makes stream wait (on the device) for the work event was recorded after;
 * rf_rt_event_query returns RF_RT_OK once that work is done, RF_RT_NOT_READY
 * before. */
int rf_rt_stream_create(int dev, void **stream);
int rf_rt_stream_destroy(int dev, void *stream);
int rf_rt_event_create(int dev, void **event);
int rf_rt_event_destroy(int dev, void *event);
int rf_rt_event_record(int dev, void *event, void *stream);
int rf_rt_stream_wait(int dev, void *stream, void *event);
int rf_rt_event_query(int dev, void *event);
int rf_rt_event_synchronize(int dev, void *event);      /* the host waits for that work */

/* Peer copies: bytes from src on src_dev to dst on dst_dev (the same device
 * too), queued on stream, a stream of dst_dev (NULL: its default stream).
 * rf_rt_enable_peer lets dev reach peer's memory directly where the hardware
 * can (*enabled: 1, or 0 when copies between them go through the host); a
 * second call is harmless. */
int rf_rt_copy_peer_async(int dst_dev, uint64_t dst, int src_dev, uint64_t src, size_t bytes, void *stream);
int rf_rt_enable_peer(int dev, int peer, int *enabled);

/* Kernel modules: load a code object (CUDA fatbin or HIP code object) on
 * dev (a failure's message carries the loader's error log), find a kernel
 * by name, launch it on a stream with shared_bytes of dynamic shared memory. */
int rf_rt_module_load(int dev, const void *image, void **module);
int rf_rt_module_unload(int dev, void *module);
int rf_rt_function(int dev, void *module, const char *name, void **fn);
int rf_rt_launch(int dev, void *fn, const unsigned grid[3], const unsigned block[3], unsigned shared_bytes,
                 void **params, void *stream);

/* The last runtime error of this thread: its code, and its message in msg. */
int rf_rt_last_error(char *msg, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
