/* The runtime loader and thin wrappers; see rf_runtime.h. */
#define _GNU_SOURCE
#include "rf_runtime.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

/* One list of every symbol: table field, HIP name, CUDA driver name, and
 * parameters. Both APIs take and return the same shapes here: int status
 * codes, int device handles, 64-bit device pointers, opaque contexts. The
 * two peer calls are the exception: CUDA names the other side by context,
 * HIP by device index; the table holds CUDA's shape and their wrappers call
 * HIP's through its own (rf_hip_copy_peer, rf_hip_enable_peer). */
#define RF_SYMBOLS(X)                                                                         \
    X(init, "hipInit", "cuInit", (unsigned))                                          \
    X(device_count, "hipGetDeviceCount", "cuDeviceGetCount", (int *))                  \
    X(device_get, "hipDeviceGet", "cuDeviceGet", (int *, int))                         \
    X(device_name, "hipDeviceGetName", "cuDeviceGetName", (char *, int, int))          \
    X(total_mem, "hipDeviceTotalMem", "cuDeviceTotalMem_v2", (size_t *, int))          \
    X(ctx_retain, "hipDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", (void **, int)) \
    X(ctx_set, "hipCtxSetCurrent", "cuCtxSetCurrent", (void *))                        \
    X(mem_info, "hipMemGetInfo", "cuMemGetInfo_v2", (size_t *, size_t *))              \
    X(mem_alloc, "hipMalloc", "cuMemAlloc_v2", (uint64_t *, size_t))                   \
    X(mem_free, "hipFree", "cuMemFree_v2", (uint64_t))                                 \
    X(host_alloc, "hipHostMalloc", "cuMemHostAlloc", (void **, size_t, unsigned))       \
    X(host_free, "hipHostFree", "cuMemFreeHost", (void *))                             \
    X(memset_d8, "hipMemsetD8", "cuMemsetD8_v2", (uint64_t, unsigned char, size_t))    \
    X(copy_htod, "hipMemcpyHtoD", "cuMemcpyHtoD_v2", (uint64_t, const void *, size_t)) \
    X(copy_dtoh, "hipMemcpyDtoH", "cuMemcpyDtoH_v2", (void *, uint64_t, size_t))       \
    X(copy_dtod, "hipMemcpyDtoD", "cuMemcpyDtoD_v2", (uint64_t, uint64_t, size_t))     \
    X(copy_htod_async, "hipMemcpyHtoDAsync", "cuMemcpyHtoDAsync_v2", (uint64_t, const void *, size_t, void *)) \
    X(copy_dtoh_async, "hipMemcpyDtoHAsync", "cuMemcpyDtoHAsync_v2", (void *, uint64_t, size_t, void *)) \
    X(copy_dtod_async, "hipMemcpyDtoDAsync", "cuMemcpyDtoDAsync_v2", (uint64_t, uint64_t, size_t, void *)) \
    X(memset_d8_async, "hipMemsetD8Async", "cuMemsetD8Async", (uint64_t, unsigned char, size_t, void *)) \
    X(copy_peer_async, "hipMemcpyPeerAsync", "cuMemcpyPeerAsync",                             \
      (uint64_t, void *, uint64_t, void *, size_t, void *))                                   \
    X(can_peer, "hipDeviceCanAccessPeer", "cuDeviceCanAccessPeer", (int *, int, int))          \
    X(enable_peer, "hipDeviceEnablePeerAccess", "cuCtxEnablePeerAccess", (void *, unsigned))   \
    X(stream_create, "hipStreamCreateWithFlags", "cuStreamCreate", (void **, unsigned))       \
    X(stream_destroy, "hipStreamDestroy", "cuStreamDestroy_v2", (void *))                     \
    X(event_create, "hipEventCreateWithFlags", "cuEventCreate", (void **, unsigned))          \
    X(event_destroy, "hipEventDestroy", "cuEventDestroy_v2", (void *))                        \
    X(event_record, "hipEventRecord", "cuEventRecord", (void *, void *))                      \
    X(stream_wait_event, "hipStreamWaitEvent", "cuStreamWaitEvent", (void *, void *, unsigned)) \
    X(event_query, "hipEventQuery", "cuEventQuery", (void *))                                 \
    X(event_synchronize, "hipEventSynchronize", "cuEventSynchronize", (void *))               \
    X(synchronize, "hipCtxSynchronize", "cuCtxSynchronize", (void))                          \
    X(stream_synchronize, "hipStreamSynchronize", "cuStreamSynchronize", (void *))             \
    X(module_load, "hipModuleLoadDataEx", "cuModuleLoadDataEx",                               \
      (void **, const void *, unsigned, int *, void **))                                      \
    X(module_unload, "hipModuleUnload", "cuModuleUnload", (void *))                           \
    X(module_function, "hipModuleGetFunction", "cuModuleGetFunction", (void **, void *, const char *)) \
    X(launch, "hipModuleLaunchKernel", "cuLaunchKernel",                                      \
      (void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **))

#define RF_FIELD(field, hip, cuda, params) int (*field) params;
struct rf_table {
    RF_SYMBOLS(RF_FIELD)
};
#undef RF_FIELD

static const char *const RF_HIP_NAMES[] = {
#define RF_NAME(field, hip, cuda, params) hip,
    RF_SYMBOLS(RF_NAME)
#undef RF_NAME
};
static const char *const RF_CUDA_NAMES[] = {
#define RF_NAME(field, hip, cuda, params) cuda,
    RF_SYMBOLS(RF_NAME)
#undef RF_NAME
};
#define RF_NUM_SYMBOLS (sizeof(RF_HIP_NAMES) / sizeof(RF_HIP_NAMES[0]))

enum { RF_MAX_DEVICES = 64 };
#define RF_CU_CC_MAJOR 75   /* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR */
#define RF_CU_CC_MINOR 76
/* JIT options for module loading, numbered alike in CUjit_option and hipJitOption. */
#define RF_JIT_ERROR_LOG_BUFFER 5
#define RF_JIT_ERROR_LOG_BUFFER_SIZE_BYTES 6

static pthread_mutex_t rf_lock = PTHREAD_MUTEX_INITIALIZER;
static struct rf_table rf_fn;
static rf_backend rf_loaded = RF_BACKEND_HOST;
static void *rf_handle;
static int rf_num_devices;
static void *rf_ctx[RF_MAX_DEVICES];
/* Error-string and attribute calls differ in shape between the two APIs. */
static const char *(*rf_hip_error_string)(int);
static int (*rf_cu_error_string)(int, const char **);
static int (*rf_cu_attribute)(int *, int, int);

static __thread int rf_err_code;
static __thread char rf_err_msg[1024];

static int rf_runtime_error(int code, const char *what) {
    const char *text = NULL;
    if (rf_loaded == RF_BACKEND_HIP && rf_hip_error_string)
        text = rf_hip_error_string(code);
    else if (rf_loaded == RF_BACKEND_CUDA && rf_cu_error_string)
        rf_cu_error_string(code, &text);
    rf_err_code = code;
    snprintf(rf_err_msg, sizeof rf_err_msg, "%s failed: %s (error %d)", what,
             text ? text : "unknown error", code);
    return RF_RT_RUNTIME;
}

/* dlopen a library, reusing a copy already in the process first. */
static void *rf_open(const char *const *names) {
    for (const char *const *n = names; *n; n++) {
        void *h = dlopen(*n, RTLD_NOW | RTLD_NOLOAD);
        if (h) return h;
    }
    for (const char *const *n = names; *n; n++) {
        void *h = dlopen(*n, RTLD_NOW | RTLD_LOCAL);
        if (h) return h;
    }
    return NULL;
}

static int rf_try(rf_backend backend, char *msg, size_t cap) {
    static const char *const hip_libs[] = {"libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5", NULL};
    static const char *const cuda_libs[] = {"libcuda.so.1", "libcuda.so", NULL};
    const char *const *names = backend == RF_BACKEND_HIP ? RF_HIP_NAMES : RF_CUDA_NAMES;
    const char *lib = backend == RF_BACKEND_HIP ? "libamdhip64.so" : "libcuda.so.1";
    void *h = rf_open(backend == RF_BACKEND_HIP ? hip_libs : cuda_libs);
    struct rf_table t;
    void **slot = (void **)&t;
    int st, n = 0;
    if (!h) {
        snprintf(msg, cap, "%s not found", lib);
        return RF_RT_NO_RUNTIME;
    }
    for (size_t i = 0; i < RF_NUM_SYMBOLS; i++) {
        slot[i] = dlsym(h, names[i]);
        if (!slot[i]) {
            snprintf(msg, cap, "%s lacks symbol %s", lib, names[i]);
            dlclose(h);
            return RF_RT_MISSING_SYMBOL;
        }
    }
    st = t.init(0);
    if (st == 0) st = t.device_count(&n);
    if (st != 0 || n <= 0) {
        if (st != 0)
            snprintf(msg, cap, "%s: no usable device (init/device count returned error %d)", lib, st);
        else
            snprintf(msg, cap, "%s: no device", lib);
        dlclose(h);
        return RF_RT_NO_DEVICE;
    }
    rf_fn = t;
    rf_handle = h;
    rf_loaded = backend;
    rf_num_devices = n < RF_MAX_DEVICES ? n : RF_MAX_DEVICES;
    if (backend == RF_BACKEND_HIP) {
        *(void **)&rf_hip_error_string = dlsym(h, "hipGetErrorString");
    } else {
        *(void **)&rf_cu_error_string = dlsym(h, "cuGetErrorString");
        *(void **)&rf_cu_attribute = dlsym(h, "cuDeviceGetAttribute");
    }
    snprintf(msg, cap, "%s: %d device(s)", lib, rf_num_devices);
    return RF_RT_OK;
}

int rf_rt_load(int want, char *msg, size_t cap) {
    int st;
    char first[160] = "";
    pthread_mutex_lock(&rf_lock);
    if (rf_loaded != RF_BACKEND_HOST) {
        snprintf(msg, cap, "%s already loaded", rf_loaded == RF_BACKEND_HIP ? "HIP" : "CUDA");
        st = (want < 0 || want == (int)rf_loaded) ? RF_RT_OK : RF_RT_NOT_LOADED;
    } else if (want == RF_BACKEND_HOST) {
        snprintf(msg, cap, "host backend requested");
        st = RF_RT_NOT_LOADED;
    } else if (want == RF_BACKEND_HIP || want == RF_BACKEND_CUDA) {
        st = rf_try((rf_backend)want, msg, cap);
    } else {
        st = rf_try(RF_BACKEND_HIP, first, sizeof first);
        if (st != RF_RT_OK) {
            char second[160];
            st = rf_try(RF_BACKEND_CUDA, second, sizeof second);
            if (st == RF_RT_OK)
                snprintf(msg, cap, "%s (HIP: %s)", second, first);
            else
                snprintf(msg, cap, "%s; %s", first, second);
        } else {
            snprintf(msg, cap, "%s", first);
        }
    }
    pthread_mutex_unlock(&rf_lock);
    return st;
}

rf_backend rf_rt_backend(void) { return rf_loaded; }

/* Make dev's primary context current on this thread (retained once). */
static int rf_use(int dev) {
    int st, handle;
    if (rf_loaded == RF_BACKEND_HOST) return RF_RT_NOT_LOADED;
    if (dev < 0 || dev >= rf_num_devices) return RF_RT_BAD_DEVICE;
    if (!rf_ctx[dev]) {
        void *ctx = NULL;
        pthread_mutex_lock(&rf_lock);
        st = rf_fn.device_get(&handle, dev);
        if (st == 0 && !rf_ctx[dev]) st = rf_fn.ctx_retain(&ctx, handle);
        if (st == 0 && !rf_ctx[dev]) rf_ctx[dev] = ctx;
        pthread_mutex_unlock(&rf_lock);
        if (st != 0) return rf_runtime_error(st, "retaining the device context");
    }
    st = rf_fn.ctx_set(rf_ctx[dev]);
    return st == 0 ? RF_RT_OK : rf_runtime_error(st, "setting the device context");
}

int rf_rt_device_count(int *count) {
    *count = rf_loaded == RF_BACKEND_HOST ? 0 : rf_num_devices;
    return RF_RT_OK;
}

int rf_rt_device_info(int dev, char *name, size_t name_cap, char *arch, size_t arch_cap,
                      size_t *total_bytes, size_t *free_bytes) {
    int st = rf_use(dev), handle, major = 0, minor = 0;
    size_t total = 0;
    if (st != RF_RT_OK) return st;
    if ((st = rf_fn.device_get(&handle, dev)) != 0) return rf_runtime_error(st, "getting the device");
    if ((st = rf_fn.device_name(name, (int)name_cap, handle)) != 0)
        return rf_runtime_error(st, "reading the device name");
    if ((st = rf_fn.total_mem(&total, handle)) != 0) return rf_runtime_error(st, "reading total memory");
    if ((st = rf_fn.mem_info(free_bytes, total_bytes)) != 0) return rf_runtime_error(st, "reading free memory");
    arch[0] = '\0';
    if (rf_loaded == RF_BACKEND_CUDA && rf_cu_attribute && rf_cu_attribute(&major, RF_CU_CC_MAJOR, handle) == 0
        && rf_cu_attribute(&minor, RF_CU_CC_MINOR, handle) == 0)
        snprintf(arch, arch_cap, "sm_%d%d", major, minor);
    return RF_RT_OK;
}

#define RF_CALL(expr, what)                                    \
    do {                                                       \
        int rf_st_ = rf_use(dev);                              \
        if (rf_st_ != RF_RT_OK) return rf_st_;                 \
        rf_st_ = (expr);                                       \
        return rf_st_ == 0 ? RF_RT_OK : rf_runtime_error(rf_st_, what); \
    } while (0)

int rf_rt_malloc(int dev, size_t bytes, uint64_t *ptr) { RF_CALL(rf_fn.mem_alloc(ptr, bytes), "device allocation"); }
int rf_rt_free(int dev, uint64_t ptr) { RF_CALL(rf_fn.mem_free(ptr), "device free"); }
/* Page-locked host memory, usable by every device (flag 1: hipHostMallocPortable,
 * CU_MEMHOSTALLOC_PORTABLE), so copies to and from it can run asynchronously. */
int rf_rt_host_alloc(int dev, size_t bytes, void **ptr) { RF_CALL(rf_fn.host_alloc(ptr, bytes, 1), "pinned host allocation"); }
int rf_rt_host_free(int dev, void *ptr) { RF_CALL(rf_fn.host_free(ptr), "pinned host free"); }
int rf_rt_memset(int dev, uint64_t ptr, unsigned char value, size_t bytes) {
    RF_CALL(rf_fn.memset_d8(ptr, value, bytes), "device memset");
}
int rf_rt_copy_htod(int dev, uint64_t dst, const void *src, size_t bytes) {
    RF_CALL(rf_fn.copy_htod(dst, src, bytes), "host-to-device copy");
}
int rf_rt_copy_dtoh(int dev, void *dst, uint64_t src, size_t bytes) {
    RF_CALL(rf_fn.copy_dtoh(dst, src, bytes), "device-to-host copy");
}
int rf_rt_copy_dtod(int dev, uint64_t dst, uint64_t src, size_t bytes) {
    RF_CALL(rf_fn.copy_dtod(dst, src, bytes), "device-to-device copy");
}
int rf_rt_memset_async(int dev, uint64_t ptr, unsigned char value, size_t bytes, void *stream) {
    RF_CALL(rf_fn.memset_d8_async(ptr, value, bytes, stream), "device memset");
}
int rf_rt_copy_htod_async(int dev, uint64_t dst, const void *src, size_t bytes, void *stream) {
    RF_CALL(rf_fn.copy_htod_async(dst, src, bytes, stream), "host-to-device copy");
}
int rf_rt_copy_dtoh_async(int dev, void *dst, uint64_t src, size_t bytes, void *stream) {
    RF_CALL(rf_fn.copy_dtoh_async(dst, src, bytes, stream), "device-to-host copy");
}
int rf_rt_copy_dtod_async(int dev, uint64_t dst, uint64_t src, size_t bytes, void *stream) {
    RF_CALL(rf_fn.copy_dtod_async(dst, src, bytes, stream), "device-to-device copy");
}
typedef int (*rf_hip_copy_peer)(uint64_t, int, uint64_t, int, size_t, void *);
typedef int (*rf_hip_enable_peer)(int, unsigned);
#define RF_PEER_ALREADY_ENABLED 704     /* CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, hipErrorPeerAccessAlreadyEnabled */

int rf_rt_copy_peer_async(int dst_dev, uint64_t dst, int src_dev, uint64_t src, size_t bytes, void *stream) {
    int st = rf_use(src_dev);           /* both contexts retained; dst_dev's is left current */
    if (st != RF_RT_OK) return st;
    if ((st = rf_use(dst_dev)) != RF_RT_OK) return st;
    if (rf_loaded == RF_BACKEND_HIP)
        st = ((rf_hip_copy_peer)rf_fn.copy_peer_async)(dst, dst_dev, src, src_dev, bytes, stream);
    else
        st = rf_fn.copy_peer_async(dst, rf_ctx[dst_dev], src, rf_ctx[src_dev], bytes, stream);
    return st == 0 ? RF_RT_OK : rf_runtime_error(st, "peer copy");
}

int rf_rt_enable_peer(int dev, int peer, int *enabled) {
    int st, can = 0, handle, peer_handle;
    *enabled = dev == peer;
    if (dev == peer) return rf_use(dev);
    if ((st = rf_use(peer)) != RF_RT_OK || (st = rf_use(dev)) != RF_RT_OK) return st;
    if ((st = rf_fn.device_get(&handle, dev)) != 0 || (st = rf_fn.device_get(&peer_handle, peer)) != 0)
        return rf_runtime_error(st, "getting the device");
    if ((st = rf_fn.can_peer(&can, handle, peer_handle)) != 0) return rf_runtime_error(st, "asking for peer access");
    if (!can) return RF_RT_OK;
    if (rf_loaded == RF_BACKEND_HIP)
        st = ((rf_hip_enable_peer)rf_fn.enable_peer)(peer, 0);
    else
        st = rf_fn.enable_peer(rf_ctx[peer], 0);
    if (st != 0 && st != RF_PEER_ALREADY_ENABLED) return rf_runtime_error(st, "enabling peer access");
    *enabled = 1;
    return RF_RT_OK;
}

/* Flags numbered alike in both APIs: CU_STREAM_NON_BLOCKING / hipStreamNonBlocking,
 * CU_EVENT_DISABLE_TIMING / hipEventDisableTiming; and the not-ready status. */
#define RF_STREAM_NON_BLOCKING 1
#define RF_EVENT_DISABLE_TIMING 2
#define RF_NOT_READY 600

int rf_rt_stream_create(int dev, void **stream) {
    RF_CALL(rf_fn.stream_create(stream, RF_STREAM_NON_BLOCKING), "creating a stream");
}
int rf_rt_stream_destroy(int dev, void *stream) { RF_CALL(rf_fn.stream_destroy(stream), "destroying a stream"); }
int rf_rt_event_create(int dev, void **event) {
    RF_CALL(rf_fn.event_create(event, RF_EVENT_DISABLE_TIMING), "creating an event");
}
int rf_rt_event_destroy(int dev, void *event) { RF_CALL(rf_fn.event_destroy(event), "destroying an event"); }
int rf_rt_event_record(int dev, void *event, void *stream) {
    RF_CALL(rf_fn.event_record(event, stream), "recording an event");
}
int rf_rt_stream_wait(int dev, void *stream, void *event) {
    RF_CALL(rf_fn.stream_wait_event(stream, event, 0), "making a stream wait for an event");
}
int rf_rt_event_query(int dev, void *event) {
    int st = rf_use(dev);
    if (st != RF_RT_OK) return st;
    st = rf_fn.event_query(event);
    if (st == RF_NOT_READY) return RF_RT_NOT_READY;
    return st == 0 ? RF_RT_OK : rf_runtime_error(st, "querying an event");
}

int rf_rt_event_synchronize(int dev, void *event) {
    RF_CALL(rf_fn.event_synchronize(event), "waiting for an event");
}

int rf_rt_synchronize(int dev) { RF_CALL(rf_fn.synchronize(), "synchronize"); }
int rf_rt_stream_synchronize(int dev, void *stream) {
    RF_CALL(rf_fn.stream_synchronize(stream), "stream synchronize");
}

int rf_rt_module_load(int dev, const void *image, void **module) {
    char log[1024] = "";
    int options[2] = {RF_JIT_ERROR_LOG_BUFFER, RF_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *values[2] = {log, (void *)(uintptr_t)sizeof log};
    int st = rf_use(dev);
    if (st != RF_RT_OK) return st;
    st = rf_fn.module_load(module, image, 2, options, values);
    if (st == 0) return RF_RT_OK;
    rf_runtime_error(st, "loading a kernel module");
    if (log[0]) {
        size_t used = strlen(rf_err_msg);
        log[sizeof log - 1] = '\0';
        snprintf(rf_err_msg + used, sizeof rf_err_msg - used, "; loader log: %s", log);
    }
    return RF_RT_RUNTIME;
}
int rf_rt_module_unload(int dev, void *module) { RF_CALL(rf_fn.module_unload(module), "unloading a kernel module"); }
int rf_rt_function(int dev, void *module, const char *name, void **fn) {
    RF_CALL(rf_fn.module_function(fn, module, name), "finding a kernel");
}
int rf_rt_launch(int dev, void *fn, const unsigned grid[3], const unsigned block[3], unsigned shared_bytes,
                 void **params, void *stream) {
    RF_CALL(rf_fn.launch(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_bytes, stream, params,
                         NULL),
            "launching a kernel");
}

int rf_rt_last_error(char *msg, size_t cap) {
    snprintf(msg, cap, "%s", rf_err_msg);
    return rf_err_code;
}
