// The kernel templates of rkfast._C. Included twice by kernels.cpp: once for the baseline instruction set
// and once under `#pragma GCC target("avx2")`, the copy used at run time on CPUs that have AVX2 (the
// extension is built for any x86-64, so -march=native is not assumed). Standard headers are included by
// kernels.cpp before this file; this file only defines templates inside the namespace it is included in.

constexpr int64_t kBlock = 8192;         // elementwise ops: work items of this many elements
constexpr int64_t kReduceBlock = 32768;  // reductions over tasks: columns per partial sum (fits L2)
// below this many elements touched, threads cost more than they save
constexpr int64_t kParallelMin = int64_t(1) << 15;

template <typename T>
inline T* at(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

inline int threads_for(int64_t work, int nthreads) {
    return (work >= kParallelMin && nthreads > 1) ? nthreads : 1;
}

// One pass of up to four slopes: o = base - c0*k0 - c1*k1 - c2*k2 - c3*k3 (left to right, as the
// reference's chain of subtractions rounds). IN_PLACE: the base is o itself (slopes beyond the fourth).
template <typename T, int M, bool IN_PLACE>
inline void fold_slopes(T* __restrict__ o, const T* __restrict__ base, const T* const* k, const T* c, int64_t len) {
    const T* __restrict__ k0 = k[0];
    const T* __restrict__ k1 = M > 1 ? k[1] : k[0];
    const T* __restrict__ k2 = M > 2 ? k[2] : k[0];
    const T* __restrict__ k3 = M > 3 ? k[3] : k[0];
    const T c0 = c[0], c1 = M > 1 ? c[1] : T(0), c2 = M > 2 ? c[2] : T(0), c3 = M > 3 ? c[3] : T(0);
    for (int64_t i = 0; i < len; ++i) {
        T v = (IN_PLACE ? o[i] : base[i]) - c0 * k0[i];
        if constexpr (M > 1) v -= c1 * k1[i];
        if constexpr (M > 2) v -= c2 * k2[i];
        if constexpr (M > 3) v -= c3 * k3[i];
        o[i] = v;
    }
}

template <typename T, bool IN_PLACE>
inline void fold_group(T* o, const T* base, const T* const* k, const T* c, int64_t m, int64_t len) {
    switch (m) {
        case 1: fold_slopes<T, 1, IN_PLACE>(o, base, k, c, len); break;
        case 2: fold_slopes<T, 2, IN_PLACE>(o, base, k, c, len); break;
        case 3: fold_slopes<T, 3, IN_PLACE>(o, base, k, c, len); break;
        default: fold_slopes<T, 4, IN_PLACE>(o, base, k, c, len); break;
    }
}

// out[t, :] = theta - sum_l coef[l] * slopes[l][t, :]: each output element written once for up to four
// slopes, with no staging copy (the common tableaus have at most three slopes per stage)
template <typename T>
void stage_point(uintptr_t theta_addr, const Addresses& slope_addrs, const std::vector<double>& coefs,
                 uintptr_t out_addr, int64_t tasks, int64_t n, int nthreads) {
    const T* theta = at<const T>(theta_addr);
    T* out = at<T>(out_addr);
    const int64_t num = static_cast<int64_t>(slope_addrs.size());
    std::vector<const T*> slopes(num);
    std::vector<T> c(num);
    for (int64_t l = 0; l < num; ++l) {
        slopes[l] = at<const T>(slope_addrs[l]);
        c[l] = static_cast<T>(coefs[l]);
    }
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t items = tasks * blocks;
    const int nt = threads_for(tasks * n * (num + 1), nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t t = item / blocks;
        const int64_t start = (item % blocks) * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        const int64_t offset = t * n + start;
        T* o = out + offset;
        const T* rows[4];
        for (int64_t g = 0; g < num; g += 4) {
            const int64_t m = std::min<int64_t>(4, num - g);
            for (int64_t l = 0; l < m; ++l) rows[l] = slopes[g + l] + offset;
            if (g == 0) fold_group<T, false>(o, theta + start, rows, c.data() + g, m, len);
            else fold_group<T, true>(o, nullptr, rows, c.data() + g, m, len);
        }
    }
}

// grad_theta = sum_t grad_out[t, :];  grad_slopes[l][t, :] = -coef[l] * grad_out[t, :]  (one pass over
// grad_out: each row block is read once, from L1, for the sum and every slope gradient)
template <typename T>
void stage_point_backward(uintptr_t grad_out_addr, const std::vector<double>& coefs, uintptr_t grad_theta_addr,
                          const Addresses& grad_slope_addrs, int64_t tasks, int64_t n, int nthreads) {
    const T* grad_out = at<const T>(grad_out_addr);
    T* grad_theta = grad_theta_addr ? at<T>(grad_theta_addr) : nullptr;
    const int64_t num = static_cast<int64_t>(grad_slope_addrs.size());
    std::vector<T*> grad_slopes(num);
    std::vector<T> c(num);
    for (int64_t l = 0; l < num; ++l) {
        grad_slopes[l] = at<T>(grad_slope_addrs[l]);
        c[l] = -static_cast<T>(coefs[l]);
    }
    constexpr int64_t block = 2048;  // a row block stays in L1 while the slope gradients are written
    const int64_t blocks = (n + block - 1) / block;
    const int nt = threads_for(tasks * n * (num + 1), nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * block;
        const int64_t len = std::min(block, n - start);
        T* __restrict__ acc = grad_theta ? grad_theta + start : nullptr;  // the output block accumulates
        for (int64_t t = 0; t < tasks; ++t) {
            const T* __restrict__ g = grad_out + t * n + start;
            if (acc && t == 0) {
                for (int64_t i = 0; i < len; ++i) acc[i] = g[i];
            } else if (acc) {
                for (int64_t i = 0; i < len; ++i) acc[i] += g[i];
            }
            for (int64_t l = 0; l < num; ++l) {
                const T cl = c[l];
                T* __restrict__ o = grad_slopes[l] + t * n + start;
                for (int64_t i = 0; i < len; ++i) o[i] = cl * g[i];
            }
        }
    }
}

// part += r[0] + r[1] + ... (left to right: the same rounding as adding the rows one by one)
template <typename T, int M>
inline void add_rows(T* __restrict__ part, const T* const* r, int64_t len) {
    const T* __restrict__ r0 = r[0];
    const T* __restrict__ r1 = M > 1 ? r[1] : r[0];
    const T* __restrict__ r2 = M > 2 ? r[2] : r[0];
    const T* __restrict__ r3 = M > 3 ? r[3] : r[0];
    for (int64_t i = 0; i < len; ++i) {
        T v = part[i] + r0[i];
        if constexpr (M > 1) v += r1[i];
        if constexpr (M > 2) v += r2[i];
        if constexpr (M > 3) v += r3[i];
        part[i] = v;
    }
}

// out = sum_l w[l] * sum_t grads[l][t, :]  (the reference's order of operations)
//
// Blocks of kReduceBlock columns: the partial column sum (in L2) takes four task rows per pass, so each
// pass reads four long contiguous streams and touches the partial sum once for four rows; long blocks
// keep the hardware prefetchers on each row stream for long. The output block is the accumulator.
template <typename T>
void combine(const Addresses& grad_addrs, const std::vector<double>& weights, uintptr_t out_addr, int64_t tasks,
             int64_t n, int nthreads) {
    T* out = at<T>(out_addr);
    const int64_t num = static_cast<int64_t>(grad_addrs.size());
    std::vector<const T*> grads(num);
    std::vector<T> w(num);
    for (int64_t l = 0; l < num; ++l) {
        grads[l] = at<const T>(grad_addrs[l]);
        w[l] = static_cast<T>(weights[l]);
    }
    const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
    const int nt = threads_for(tasks * n * num, nthreads);
#pragma omp parallel num_threads(nt)
    {
        std::vector<T> part_buffer(static_cast<size_t>(std::min(kReduceBlock, n)));
        T* __restrict__ part = part_buffer.data();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t start = b * kReduceBlock;
            const int64_t len = std::min(kReduceBlock, n - start);
            T* __restrict__ o = out + start;
            for (int64_t l = 0; l < num; ++l) {
                const T* g = grads[l] + start;
                // one task: its row is the column sum (no partial-sum pass)
                const T* __restrict__ column = tasks == 1 ? g : part;
                if (tasks > 1) {
                    for (int64_t i = 0; i < len; ++i) part[i] = g[i];  // row 0 (0 + x == x exactly)
                }
                const T* rows[4];
                int64_t t = 1;
                for (; t + 4 <= tasks; t += 4) {
                    for (int r = 0; r < 4; ++r) rows[r] = g + (t + r) * n;
                    add_rows<T, 4>(part, rows, len);
                }
                for (; t < tasks; ++t) {
                    rows[0] = g + t * n;
                    add_rows<T, 1>(part, rows, len);
                }
                const T wl = w[l];
                if (l == 0) {
                    for (int64_t i = 0; i < len; ++i) o[i] = column[i] * wl;
                } else {
                    for (int64_t i = 0; i < len; ++i) o[i] += wl * column[i];
                }
            }
        }
    }
}

// theta += alpha * d
template <typename T>
void axpy(uintptr_t theta_addr, uintptr_t d_addr, double alpha, int64_t n, int nthreads) {
    T* __restrict__ theta = at<T>(theta_addr);
    const T* __restrict__ d = at<const T>(d_addr);
    const T a = static_cast<T>(alpha);
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int nt = threads_for(n, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        T* __restrict__ x = theta + start;
        const T* __restrict__ y = d + start;
        for (int64_t i = 0; i < len; ++i) x[i] += a * y[i];
    }
}

// -- stage_point_elementwise: one coefficient per element (an [N] vector per slope, shared by the tasks) --

// One pass of up to four slopes: o = base - c0*k0 - c1*k1 - c2*k2 - c3*k3 with per-element coefficients
// (left to right, as the reference's chain of addcmul rounds). IN_PLACE: the base is o itself.
template <typename T, int M, bool IN_PLACE>
inline void fold_slopes_elementwise(T* __restrict__ o, const T* __restrict__ base, const T* const* k,
                                    const T* const* c, int64_t len) {
    const T* __restrict__ k0 = k[0];
    const T* __restrict__ k1 = M > 1 ? k[1] : k[0];
    const T* __restrict__ k2 = M > 2 ? k[2] : k[0];
    const T* __restrict__ k3 = M > 3 ? k[3] : k[0];
    const T* __restrict__ c0 = c[0];
    const T* __restrict__ c1 = M > 1 ? c[1] : c[0];
    const T* __restrict__ c2 = M > 2 ? c[2] : c[0];
    const T* __restrict__ c3 = M > 3 ? c[3] : c[0];
    for (int64_t i = 0; i < len; ++i) {
        T v = (IN_PLACE ? o[i] : base[i]) - c0[i] * k0[i];
        if constexpr (M > 1) v -= c1[i] * k1[i];
        if constexpr (M > 2) v -= c2[i] * k2[i];
        if constexpr (M > 3) v -= c3[i] * k3[i];
        o[i] = v;
    }
}

template <typename T, bool IN_PLACE>
inline void fold_group_elementwise(T* o, const T* base, const T* const* k, const T* const* c, int64_t m,
                                   int64_t len) {
    switch (m) {
        case 1: fold_slopes_elementwise<T, 1, IN_PLACE>(o, base, k, c, len); break;
        case 2: fold_slopes_elementwise<T, 2, IN_PLACE>(o, base, k, c, len); break;
        case 3: fold_slopes_elementwise<T, 3, IN_PLACE>(o, base, k, c, len); break;
        default: fold_slopes_elementwise<T, 4, IN_PLACE>(o, base, k, c, len); break;
    }
}

// out[t, :] = theta - sum_l coefs[l] * slopes[l][t, :] (coefs[l] an [N] vector). Work items are ordered
// block-major (the tasks of one column block are consecutive), so under the static schedule a thread reuses
// the block of theta and of every coefficient vector from cache for all tasks.
template <typename T>
void stage_point_elementwise(uintptr_t theta_addr, const Addresses& slope_addrs, const Addresses& coef_addrs,
                             uintptr_t out_addr, int64_t tasks, int64_t n, int nthreads) {
    const T* theta = at<const T>(theta_addr);
    T* out = at<T>(out_addr);
    const int64_t num = static_cast<int64_t>(slope_addrs.size());
    std::vector<const T*> slopes(num), coefs(num);
    for (int64_t l = 0; l < num; ++l) {
        slopes[l] = at<const T>(slope_addrs[l]);
        coefs[l] = at<const T>(coef_addrs[l]);
    }
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t items = tasks * blocks;
    const int nt = threads_for(tasks * n * (num + 1) + n * num, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t t = item % tasks;
        const int64_t start = (item / tasks) * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        const int64_t offset = t * n + start;
        T* o = out + offset;
        const T* rows[4];
        const T* cs[4];
        for (int64_t g = 0; g < num; g += 4) {
            const int64_t m = std::min<int64_t>(4, num - g);
            for (int64_t l = 0; l < m; ++l) {
                rows[l] = slopes[g + l] + offset;
                cs[l] = coefs[g + l] + start;
            }
            if (g == 0) fold_group_elementwise<T, false>(o, theta + start, rows, cs, m, len);
            else fold_group_elementwise<T, true>(o, nullptr, rows, cs, m, len);
        }
    }
}

// grad_theta = sum_t grad_out[t, :];  grad_slopes[l][t, :] = -coefs[l] * grad_out[t, :];
// grad_coefs[l] = -sum_t grad_out[t, :] * slopes[l][t, :]. One pass over grad_out (each row block is read
// once, from L1, for every output); the column sums accumulate in the output blocks, which are negated at
// the end (-(a + b) == -a - b exactly). An empty address list (or address 0 for grad_theta) skips an output.
template <typename T>
void stage_point_elementwise_backward(uintptr_t grad_out_addr, const Addresses& slope_addrs,
                                      const Addresses& coef_addrs, uintptr_t grad_theta_addr,
                                      const Addresses& grad_slope_addrs, const Addresses& grad_coef_addrs,
                                      int64_t tasks, int64_t n, int nthreads) {
    const T* grad_out = at<const T>(grad_out_addr);
    T* grad_theta = grad_theta_addr ? at<T>(grad_theta_addr) : nullptr;
    const int64_t num_slopes = static_cast<int64_t>(grad_slope_addrs.size());  // 0 or s'
    const int64_t num_coefs = static_cast<int64_t>(grad_coef_addrs.size());   // 0 or s'
    std::vector<const T*> slopes(num_coefs), coefs(num_slopes);
    std::vector<T*> grad_slopes(num_slopes), grad_coefs(num_coefs);
    for (int64_t l = 0; l < num_slopes; ++l) {
        coefs[l] = at<const T>(coef_addrs[l]);
        grad_slopes[l] = at<T>(grad_slope_addrs[l]);
    }
    for (int64_t l = 0; l < num_coefs; ++l) {
        slopes[l] = at<const T>(slope_addrs[l]);
        grad_coefs[l] = at<T>(grad_coef_addrs[l]);
    }
    constexpr int64_t block = 2048;  // a row block stays in L1 while the gradients are written
    const int64_t blocks = (n + block - 1) / block;
    const int nt = threads_for(tasks * n * (1 + num_slopes + num_coefs), nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * block;
        const int64_t len = std::min(block, n - start);
        T* __restrict__ acc = grad_theta ? grad_theta + start : nullptr;
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t offset = t * n + start;
            const T* __restrict__ g = grad_out + offset;
            if (acc && t == 0) {
                for (int64_t i = 0; i < len; ++i) acc[i] = g[i];
            } else if (acc) {
                for (int64_t i = 0; i < len; ++i) acc[i] += g[i];
            }
            for (int64_t l = 0; l < num_slopes; ++l) {
                const T* __restrict__ c = coefs[l] + start;
                T* __restrict__ o = grad_slopes[l] + offset;
                for (int64_t i = 0; i < len; ++i) o[i] = -(c[i] * g[i]);
            }
            for (int64_t l = 0; l < num_coefs; ++l) {
                const T* __restrict__ k = slopes[l] + offset;
                T* __restrict__ o = grad_coefs[l] + start;
                if (t == 0) {
                    for (int64_t i = 0; i < len; ++i) o[i] = g[i] * k[i];
                } else {
                    for (int64_t i = 0; i < len; ++i) o[i] += g[i] * k[i];
                }
            }
        }
        for (int64_t l = 0; l < num_coefs; ++l) {
            T* __restrict__ o = grad_coefs[l] + start;
            for (int64_t i = 0; i < len; ++i) o[i] = -o[i];
        }
    }
}
