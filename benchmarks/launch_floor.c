/* The floor under write_kv's host cost: the CUDA driver calls behind one
 * launch, timed with nothing else around them. It loads rocmforge's packaged
 * K/V kernels and launches rf_write_kv for one padding token (slot -1: the
 * kernel reads its row and writes nothing), with its 15 arguments as an array
 * of pointers (what rocmforge passes) and packed in one buffer, on the
 * legacy default stream (NULL, what write_kv uses without a stream), the
 * per-thread default stream and a stream made non-blocking (as torch's side
 * streams are), beside cuCtxSetCurrent and cuCtxGetCurrent (what a launch may
 * add to make the device current).
 *
 *   nvcc -O2 -o launch_floor benchmarks/launch_floor.c -lcuda
 *   ./launch_floor "$(python -c 'import rocmforge, os; print(os.path.dirname(rocmforge.__file__))')/kernels/kv_kernels.fatbin"
 *
 * Prints median ns per call over 41 bursts of 200 calls (the GPU drains
 * between bursts, so its queue never fills and the host is what is timed),
 * then one JSON line. Needs an NVIDIA GPU. */
#define _POSIX_C_SOURCE 199309L
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BURSTS 41
#define CALLS 200

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void check(CUresult r, const char *what) {
    if (r != CUDA_SUCCESS) {
        const char *name = NULL;
        cuGetErrorName(r, &name);
        fprintf(stderr, "launch_floor: %s failed: %s\n", what, name ? name : "unknown error");
        exit(1);
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* rf_write_kv's arguments in the kernel's own layout, for CU_LAUNCH_PARAM_BUFFER_POINTER */
struct write_kv_args {
    uint64_t key_cache, value_cache, key, value, slots;
    int64_t T, row, k_stride, v_stride, num_slots;
    int32_t in_dt, cache_dt;
    float inv_k, inv_v;
    uint64_t bad;
};

enum { SET, GET, LAUNCH, LAUNCH_PACKED, SET_LAUNCH, LAUNCH_PER_THREAD, LAUNCH_NON_BLOCKING, CASES };
static const char *NAMES[CASES] = {"cuCtxSetCurrent", "cuCtxGetCurrent", "cuLaunchKernel (15 argument pointers)",
                                   "cuLaunchKernel (arguments packed)", "cuCtxSetCurrent + cuLaunchKernel",
                                   "cuLaunchKernel, per-thread stream", "cuLaunchKernel, non-blocking stream"};

int main(int argc, char **argv) {
    CUdevice dev;
    CUcontext ctx, cur;
    CUmodule mod;
    CUfunction fn;
    CUdeviceptr mem;
    CUstream side;
    double median[CASES];
    if (argc != 2) {
        fprintf(stderr, "usage: launch_floor PATH/kv_kernels.fatbin\n");
        return 2;
    }
    check(cuInit(0), "cuInit");
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    check(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    check(cuModuleLoad(&mod, argv[1]), "cuModuleLoad");
    check(cuModuleGetFunction(&fn, mod, "rf_write_kv"), "cuModuleGetFunction");
    check(cuStreamCreate(&side, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    /* one float16 row of 8 x 128 for key and value, the caches' row, a slot of -1, the bad-slot word */
    check(cuMemAlloc(&mem, 4 * 2048 + 16), "cuMemAlloc");
    check(cuMemsetD8(mem, 0xff, 4 * 2048 + 16), "cuMemsetD8");
    struct write_kv_args a = {mem, mem + 2048, mem + 4096, mem + 6144, mem + 8192, 1, 1024, 2048, 2048, 1, 1, 1,
                              1.0f, 1.0f, mem + 8200};
    void *params[15] = {&a.key_cache, &a.value_cache, &a.key, &a.value, &a.slots, &a.T, &a.row, &a.k_stride,
                        &a.v_stride, &a.num_slots, &a.in_dt, &a.cache_dt, &a.inv_k, &a.inv_v, &a.bad};
    size_t size = sizeof a;
    void *packed[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &a, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, CU_LAUNCH_PARAM_END};
    for (int c = 0; c < CASES; c++) {
        double t[BURSTS];
        for (int b = 0; b < BURSTS; b++) {
            check(cuCtxSynchronize(), "cuCtxSynchronize");
            double t0 = now_ns();
            for (int i = 0; i < CALLS; i++) {
                CUresult r = CUDA_SUCCESS;
                switch (c) {
                case SET: r = cuCtxSetCurrent(ctx); break;
                case GET: r = cuCtxGetCurrent(&cur); break;
                case LAUNCH: r = cuLaunchKernel(fn, 1, 1, 1, 64, 4, 1, 0, NULL, params, NULL); break;
                case LAUNCH_PACKED: r = cuLaunchKernel(fn, 1, 1, 1, 64, 4, 1, 0, NULL, NULL, packed); break;
                case LAUNCH_PER_THREAD:
                    r = cuLaunchKernel(fn, 1, 1, 1, 64, 4, 1, 0, CU_STREAM_PER_THREAD, params, NULL);
                    break;
                case LAUNCH_NON_BLOCKING: r = cuLaunchKernel(fn, 1, 1, 1, 64, 4, 1, 0, side, params, NULL); break;
                default:
                    r = cuCtxSetCurrent(ctx);
                    if (r == CUDA_SUCCESS) r = cuLaunchKernel(fn, 1, 1, 1, 64, 4, 1, 0, NULL, params, NULL);
                }
                check(r, NAMES[c]);
            }
            t[b] = (now_ns() - t0) / CALLS;
        }
        qsort(t, BURSTS, sizeof t[0], cmp);
        median[c] = t[BURSTS / 2];
    }
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    printf("host ns per call, median of %d bursts of %d\n", BURSTS, CALLS);
    for (int c = 0; c < CASES; c++) printf("%-40s %9.1f\n", NAMES[c], median[c]);
    printf("{");
    for (int c = 0; c < CASES; c++) printf("%s\"%s\": %.1f", c ? ", " : "", NAMES[c], median[c]);
    printf("}\n");
    cuStreamDestroy(side);
    cuMemFree(mem);
    cuModuleUnload(mod);
    cuDevicePrimaryCtxRelease(dev);
    return 0;
}
