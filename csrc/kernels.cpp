// rkfast._C: the RK stage arithmetic on raw contiguous CPU buffers (float32 / float64).
//
// Not built against libtorch on purpose: the extension only sees addresses and sizes, so it compiles in
// seconds and does not depend on the torch ABI. The Python side (rkfast/kernels/cpp.py) checks dtype,
// device, shape and contiguity before any address reaches this file.
//
// Every op walks its buffers once, in blocks: each input streams through a block contiguously, which keeps
// the hardware prefetchers on long streams and lets the compiler vectorize the inner loops; a partial
// result, when one is needed, stays in a small buffer (L1/L2). OpenMP spreads blocks over threads (static
// schedule: every block costs the same).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

using Addresses = std::vector<uintptr_t>;  // buffer addresses, one per tensor

// Instruction-set variants of the same templates (see kernels_impl.h).
namespace baseline {
#include "kernels_impl.h"
}  // namespace baseline

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RKFAST_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

// RKFAST_CPU_ISA=baseline forces the baseline copy (to test it on an AVX2 machine).
bool use_avx2() {
#ifdef RKFAST_AVX2_CLONE
    static const bool supported = [] {
        const char* forced = std::getenv("RKFAST_CPU_ISA");
        return !(forced && std::string(forced) == "baseline") && __builtin_cpu_supports("avx2");
    }();
    return supported;
#else
    return false;
#endif
}

// Runs KERNEL<T>(args...) from the widest instruction-set copy this CPU supports.
#ifdef RKFAST_AVX2_CLONE
#define RKFAST_DISPATCH(KERNEL, T, ...) \
    (use_avx2() ? avx2::KERNEL<T>(__VA_ARGS__) : baseline::KERNEL<T>(__VA_ARGS__))
#else
#define RKFAST_DISPATCH(KERNEL, T, ...) baseline::KERNEL<T>(__VA_ARGS__)
#endif

bool is_double(const std::string& dtype) {
    if (dtype == "float64") return true;
    if (dtype == "float32") return false;
    throw std::invalid_argument("rkfast._C supports float32 and float64, got " + dtype);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "rkfast's fused RK stage kernels on raw contiguous CPU buffers (float32/float64, OpenMP).";
    auto nogil = py::call_guard<py::gil_scoped_release>();

    m.def(
        "stage_point",
        [](const std::string& dtype, uintptr_t theta, const Addresses& slopes, const std::vector<double>& coefs,
           uintptr_t out, int64_t tasks, int64_t n, int nthreads) {
            if (is_double(dtype)) RKFAST_DISPATCH(stage_point, double, theta, slopes, coefs, out, tasks, n, nthreads);
            else RKFAST_DISPATCH(stage_point, float, theta, slopes, coefs, out, tasks, n, nthreads);
        },
        nogil, "out[t] = theta - sum_l coefs[l] * slopes[l][t] for every task t (addresses of contiguous buffers)");
    m.def(
        "stage_point_backward",
        [](const std::string& dtype, uintptr_t grad_out, const std::vector<double>& coefs, uintptr_t grad_theta,
           const Addresses& grad_slopes, int64_t tasks, int64_t n, int nthreads) {
            if (is_double(dtype)) RKFAST_DISPATCH(stage_point_backward, double, grad_out, coefs, grad_theta, grad_slopes, tasks, n, nthreads);
            else RKFAST_DISPATCH(stage_point_backward, float, grad_out, coefs, grad_theta, grad_slopes, tasks, n, nthreads);
        },
        nogil, "grad_theta = sum_t grad_out[t] (skipped for address 0); grad_slopes[l] = -coefs[l] * grad_out");
    m.def(
        "stage_point_elementwise",
        [](const std::string& dtype, uintptr_t theta, const Addresses& slopes, const Addresses& coefs, uintptr_t out,
           int64_t tasks, int64_t n, int nthreads) {
            if (slopes.size() != coefs.size()) throw std::invalid_argument("one coefficient vector per slope");
            if (is_double(dtype))
                RKFAST_DISPATCH(stage_point_elementwise, double, theta, slopes, coefs, out, tasks, n, nthreads);
            else
                RKFAST_DISPATCH(stage_point_elementwise, float, theta, slopes, coefs, out, tasks, n, nthreads);
        },
        nogil, "out[t] = theta - sum_l coefs[l] * slopes[l][t] with [N] coefficient vectors (elementwise)");
    m.def(
        "stage_point_elementwise_backward",
        [](const std::string& dtype, uintptr_t grad_out, const Addresses& slopes, const Addresses& coefs,
           uintptr_t grad_theta, const Addresses& grad_slopes, const Addresses& grad_coefs, int64_t tasks, int64_t n,
           int nthreads) {
            if ((!grad_slopes.empty() && coefs.size() != grad_slopes.size()) ||
                (!grad_coefs.empty() && slopes.size() != grad_coefs.size()))
                throw std::invalid_argument("grad_slopes needs the coefficient vectors, grad_coefs the slopes");
            if (is_double(dtype))
                RKFAST_DISPATCH(stage_point_elementwise_backward, double, grad_out, slopes, coefs, grad_theta,
                                grad_slopes, grad_coefs, tasks, n, nthreads);
            else
                RKFAST_DISPATCH(stage_point_elementwise_backward, float, grad_out, slopes, coefs, grad_theta,
                                grad_slopes, grad_coefs, tasks, n, nthreads);
        },
        nogil, "grad_theta = sum_t grad_out[t] (skipped for address 0); grad_slopes[l] = -coefs[l] * grad_out; "
               "grad_coefs[l] = -sum_t grad_out[t] * slopes[l][t] (empty lists skip them)");
    m.def(
        "combine",
        [](const std::string& dtype, const Addresses& grads, const std::vector<double>& weights, uintptr_t out,
           int64_t tasks, int64_t n, int nthreads) {
            if (is_double(dtype)) RKFAST_DISPATCH(combine, double, grads, weights, out, tasks, n, nthreads);
            else RKFAST_DISPATCH(combine, float, grads, weights, out, tasks, n, nthreads);
        },
        nogil, "out = sum_l weights[l] * sum_t grads[l][t]");
    m.def(
        "axpy",
        [](const std::string& dtype, uintptr_t theta, uintptr_t d, double alpha, int64_t n, int nthreads) {
            if (is_double(dtype)) RKFAST_DISPATCH(axpy, double, theta, d, alpha, n, nthreads);
            else RKFAST_DISPATCH(axpy, float, theta, d, alpha, n, nthreads);
        },
        nogil, "theta += alpha * d, in place");
    m.def("has_openmp", []() {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
    }, "whether the extension was compiled with OpenMP");
    m.def("isa", []() { return std::string(use_avx2() ? "avx2" : "baseline"); },
          "the instruction set of the kernel copy in use on this CPU");
}
