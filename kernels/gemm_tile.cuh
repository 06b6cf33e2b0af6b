// The tiled GEMM shared by forward.cu, weight_grad.cu, propagate.cu and matmul.cu:
//
//   acc = sum_k A(m, k) * B(k, n)   for the block's BM x BN tile of C
//
// Pieces (CUTLASS's split): the operands' tile iterators (TileCopy: cp.async global -> shared;
// TileFetch: through registers, for an operand computed as it loads), the main loop over k
// (gemm_mainloop: a ring of STAGES tile pairs in shared memory, one barrier per k tile), and
// the cores' arithmetic and epilogue iteration (Simt, Warp, Tf32, Bf16: zero, multiply,
// for_each_output). Elements outside M x N x K load as zero, so no size needs to be a multiple
// of a tile. An operand is Direct (a pointer and leading dimension) or a functor load(row, k)
// (a prologue can transform elements while the tile is loaded); on_tile(Bs) sees each B tile
// once it is in shared memory (the bias-gradient sums use it). A_KROWS says A is stored k-major
// (element (m, k) at k*M + m: consecutive m are adjacent), otherwise m-major (at m*K + k);
// likewise B_KROWS for B (k-major: (k, n) at k*N + n). The load order follows the layout so
// global reads coalesce. In shared memory every tile is k-major, tile[k][row], except where a
// core has ROW_TILES (Bf16): there an m-major Direct or functor operand stays m-major, tile[row][k]
// (TileOf; RowTileCopy for a Direct one, TileFetch's ROW_MAJOR for a functor; a Transformed one must
// be k-major), and the kernel declares its GemmTiles with the operands' layouts. A functor returns
// the core's Value (for Bf16 a bf16_t).
//
// The cores, with one interface (a kernel is written once, templated on its core):
//   Simt<T, BM, BN, BK, TM, TN>  CUDA cores, float or double. Each thread owns TM x TN
//       outputs at rows ty + i*(BM/TM), columns tx + j*(BN/TN): strided, so a warp
//       reads consecutive shared-memory words and writes C coalesced. Two stages.
//   Warp<T, BM, BN, BK, WM, WN, WMITER, WNITER, TM, TN, STAGES, MIN_BLOCKS>  CUDA cores, warp
//       tiles, fragments read as 16-byte vectors, up to STAGES stages (below).
//   Tf32  tensor cores (sm_80+), float in, float accumulate, TF32 products (gemm_tf32.cuh): its
//       operands rounded to TF32 once, in shared memory, as they land (ROUNDS; gemm_mainloop).
//   Bf16  tensor cores (sm_80+), bf16 in (bf16_t tiles, fragments by ldmatrix), float
//       accumulate (gemm_bf16.cuh); its epilogue sees floats. precision="bf16" trains on it: a
//       core's Value is what the kernels store of the activations and deltas (mma.cuh stored_as).
#pragma once
#include "common.cuh"
#include "mma.cuh"

// A if C, else B (std::conditional: NVRTC compiles these headers without the standard library).
template <bool C, typename A, typename B>
struct Select {
    typedef A type;
};
template <typename A, typename B>
struct Select<false, A, B> {
    typedef B type;
};

// Static shared memory a GEMM's tiles may take (of the 48 KB a block can declare statically).
constexpr int SHARED_BUDGET = 46 * 1024;

// An operand read straight from memory: element (row, k) at p[k * ld + row] when the mainloop's
// KROWS says it is stored k-major, else at p[row * ld + k]. Its tiles go from global to shared
// memory by cp.async, never through registers. Any other operand is a functor load(row, k)
// (a prologue: computed, or with side effects), fetched into registers and stored.
template <typename T>
struct Direct {
    const T* p;
    index_t ld;
};

// A Direct operand with a prologue: element (row, k) is f(p(row, k), aux(row, k), row, k), p and
// aux both read straight from memory with leading dimension ld. Both tiles go by cp.async (aux
// into a stage buffer of its own, GemmTiles' Aux); once a thread's copies of a tile have landed
// it applies f to the elements it copied, in shared memory, one tile ahead of the multiply: f
// runs once per element a block loads, off the registers, with no barrier of its own.
template <typename T, typename F>
struct Transformed {
    const T* p;
    const T* aux;
    index_t ld;
    F f;
};

template <typename T, typename F>
__device__ __forceinline__ Transformed<T, F> transformed(const T* p, const T* aux, index_t ld, F f) {
    return Transformed<T, F>{p, aux, ld, f};
}

// The kind of a main-loop operand: 0 a functor (registers), 1 Direct, 2 Transformed.
template <typename Op>
struct operand_kind {
    static const int value = 0;
};
template <typename T>
struct operand_kind<Direct<T>> {
    static const int value = 1;
};
template <typename T, typename F>
struct operand_kind<Transformed<T, F>> {
    static const int value = 2;
};

// A functor operand's BK x ROWS tile in flight: each thread fetches its share into registers
// (all its global reads issued back to back, out-of-range elements as zero), then stores them
// to shared memory. KROWS (k-major storage): consecutive threads take consecutive rows; else
// consecutive k. Either way global reads coalesce. The tile is tile[k][row], or with ROW_MAJOR
// (a ROW_TILES core's m-major operand: backward.cu's output delta on Bf16) tile[row][k].
template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS, bool ROW_MAJOR = false>
struct TileFetch {
    static const int PER_THREAD = (BK * ROWS + THREADS - 1) / THREADS;
    static const bool EVEN = BK * ROWS % THREADS == 0;  // every thread's every slot in the tile
    typedef typename Select<ROW_MAJOR, T[ROWS][BK + PAD], T[BK][ROWS + PAD]>::type Tile;
    T v[PER_THREAD];

    static __device__ __forceinline__ T& slot(Tile& tile, int i) {
        if constexpr (ROW_MAJOR) return tile[row_of(i)][k_of(i)];
        else return tile[k_of(i)][row_of(i)];
    }

    static __device__ __forceinline__ int k_of(int i) { return KROWS ? i / ROWS : i % BK; }
    static __device__ __forceinline__ int row_of(int i) { return KROWS ? i % ROWS : i / BK; }

    template <typename Load>
    __device__ __forceinline__ void fetch(Load load, index_t r0, index_t k0, index_t R, index_t K, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            const index_t r = r0 + row_of(i), k = k0 + k_of(i);
            v[j] = ((EVEN || i < BK * ROWS) && r < R && k < K) ? load(r, k) : T(0);
        }
    }

    template <typename F>
    __device__ __forceinline__ void store(Tile& tile, int tid, F f) const {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            if (EVEN || i < BK * ROWS) slot(tile, i) = f(v[j]);
        }
    }

    // tile = f(tile) on the slots this thread stored.
    template <typename F>
    static __device__ __forceinline__ void apply(Tile& tile, int tid, F f) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int i = tid + j * THREADS;
            if (EVEN || i < BK * ROWS) slot(tile, i) = f(slot(tile, i));
        }
    }
};

// A Direct operand's BK x ROWS tile, issued as cp.async copies into one stage. k-major storage
// (rows contiguous in memory and in the tile): 16-byte copies of VEC rows where the shared rows
// are 16-byte aligned (the core's PAD), the operand's rows are (p and ld), and the VEC rows are
// inside R; element copies elsewhere (edges, misaligned views, Simt's odd PAD). Otherwise
// (consecutive k contiguous: the copy transposes) one copy per element, consecutive threads on
// consecutive k so the global reads coalesce. Elements outside R x K are zero-filled.
template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS>
struct TileCopy {
    static const int VEC = 16 / sizeof(T);
    static const bool WIDE = KROWS && (ROWS + PAD) * sizeof(T) % 16 == 0 && ROWS % VEC == 0;
    static const int UNIT = WIDE ? VEC : 1;  // elements per unit of work
    static const int UNITS = BK * ROWS / UNIT;
    static const int PER_THREAD = (UNITS + THREADS - 1) / THREADS;
    static const bool EVEN = UNITS % THREADS == 0;

    typedef T Tile[BK][ROWS + PAD];

    // (cp.async copies 4 bytes at least: a 16-bit element is loaded and stored by the thread. It
    // writes a stage no thread reads until the next barrier, as a copy would land.)
    static __device__ __forceinline__ void element(T* dst, const T* p, index_t ld, index_t r, index_t k, index_t R,
                                                   index_t K) {
        const bool inside = r < R && k < K;
        if constexpr (sizeof(T) < 4) *dst = inside ? p[KROWS ? k * ld + r : r * ld + k] : T(0);
        else cp_async<sizeof(T)>(dst, inside ? p + (KROWS ? k * ld + r : r * ld + k) : p, inside ? (int)sizeof(T) : 0);
    }

    // Unit u of the tile: its first element's k and row in the tile.
    static __device__ __forceinline__ int k_of(int u) { return WIDE ? u / (ROWS / VEC) : KROWS ? u / ROWS : u % BK; }
    static __device__ __forceinline__ int row_of(int u) {
        return WIDE ? (u % (ROWS / VEC)) * VEC : KROWS ? u % ROWS : u / BK;
    }

    static __device__ __forceinline__ void issue(Tile& tile, const T* p, index_t ld, bool wide_ok, index_t r0,
                                                 index_t k0, index_t R, index_t K, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int u = tid + j * THREADS;
            if (!EVEN && u >= UNITS) continue;
            const int kk = k_of(u), rr = row_of(u);
            const index_t r = r0 + rr, k = k0 + kk;
            if (WIDE && wide_ok && k < K && r + VEC <= R) {
                cp_async<16>(&tile[kk][rr], p + k * ld + r, 16);
            } else {
#pragma unroll
                for (int e = 0; e < UNIT; ++e) element(&tile[kk][rr + e], p, ld, r + e, k, R, K);
            }
        }
    }

    // tile = f(tile) over every slot this thread copied (zero fills too), once its copies have landed.
    template <typename F>
    static __device__ __forceinline__ void apply(Tile& tile, F f, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int u = tid + j * THREADS;
            if (!EVEN && u >= UNITS) continue;
            const int kk = k_of(u), rr = row_of(u);
            if (WIDE) {  // a unit's VEC slots, 16-byte aligned, whichever copies filled them
                Pack<T> v = *reinterpret_cast<const Pack<T>*>(&tile[kk][rr]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) v.v[e] = f(v.v[e]);
                *reinterpret_cast<Pack<T>*>(&tile[kk][rr]) = v;
            } else {
                tile[kk][rr] = f(tile[kk][rr]);
            }
        }
    }

    // tile = f(tile, aux, row, k) over the elements this thread copied (inside R x K), once its
    // copies have landed: no other thread touches them, so no barrier is needed before.
    template <typename F>
    static __device__ __forceinline__ void transform(Tile& tile, const Tile& aux, F& f, index_t r0, index_t k0,
                                                     index_t R, index_t K, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int u = tid + j * THREADS;
            if (!EVEN && u >= UNITS) continue;
            const int kk = k_of(u), rr = row_of(u);
            const index_t r = r0 + rr, k = k0 + kk;
            if (k >= K) continue;
            if (WIDE && r + VEC <= R) {  // the tile's rows are 16-byte aligned (WIDE): vector accesses
                Pack<T> v = *reinterpret_cast<const Pack<T>*>(&tile[kk][rr]);
                const Pack<T> w = *reinterpret_cast<const Pack<T>*>(&aux[kk][rr]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) v.v[e] = f(v.v[e], w.v[e], r + e, k);
                *reinterpret_cast<Pack<T>*>(&tile[kk][rr]) = v;
            } else {
#pragma unroll
                for (int e = 0; e < UNIT; ++e)
                    if (r + e < R) tile[kk][rr + e] = f(tile[kk][rr + e], aux[kk][rr + e], r + e, k);
            }
        }
    }
};

// A Direct operand stored m-major (consecutive k adjacent) kept m-major in shared memory too, as
// tile[row][k] (a core with ROW_TILES: Bf16, whose ldmatrix reads a fragment from either layout):
// 16-byte copies of VEC consecutive k of a row where the tile's rows are 16-byte aligned, the
// operand's are (p and ld) and the VEC k are inside K; element copies elsewhere. Two consecutive
// threads take a row's 16 k (32 contiguous bytes), the next two the next row. Outside R x K: zeros.
// (The 16-byte global side also needs k0 a multiple of VEC: every k tile's is, from k_begin 0;
// a split-K on a ROW_TILES core would have to keep its slices multiples of VEC.)
template <typename T, int ROWS, int BK, int PAD, int THREADS>
struct RowTileCopy {
    static const int VEC = 16 / sizeof(T);
    static const bool WIDE = (BK + PAD) * sizeof(T) % 16 == 0 && BK % VEC == 0;
    static const int UNIT = WIDE ? VEC : 1;
    static const int UNITS = BK * ROWS / UNIT;
    static const int PER_THREAD = (UNITS + THREADS - 1) / THREADS;
    static const bool EVEN = UNITS % THREADS == 0;

    typedef T Tile[ROWS][BK + PAD];

    static __device__ __forceinline__ int row_of(int u) { return u / (BK / UNIT); }
    static __device__ __forceinline__ int k_of(int u) { return (u % (BK / UNIT)) * UNIT; }

    // an element's copy is the m-major TileCopy's (the same source, only the tile slot differs)
    typedef TileCopy<T, ROWS, BK, PAD, false, THREADS> Elements;

    static __device__ __forceinline__ void issue(Tile& tile, const T* p, index_t ld, bool wide_ok, index_t r0,
                                                 index_t k0, index_t R, index_t K, int tid) {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            const int u = tid + j * THREADS;
            if (!EVEN && u >= UNITS) continue;
            const int rr = row_of(u), kk = k_of(u);
            const index_t r = r0 + rr, k = k0 + kk;
            if (WIDE && wide_ok && r < R && k + VEC <= K) {
                cp_async<16>(&tile[rr][kk], p + r * ld + k, 16);
            } else {
#pragma unroll
                for (int e = 0; e < UNIT; ++e) Elements::element(&tile[rr][kk + e], p, ld, r, k + e, R, K);
            }
        }
    }
};

// The shared-memory tile of a core's operand: tile[k][row] (k-major: every core, every layout),
// or tile[row][k] where the core keeps an m-major operand m-major (Core::ROW_TILES, !KROWS).
template <class Core, int ROWS, bool KROWS, bool ROW_MAJOR = Core::ROW_TILES && !KROWS>
struct TileOf {
    typedef typename Core::Value type[Core::BK][ROWS + Core::PAD];
};
template <class Core, int ROWS, bool KROWS>
struct TileOf<Core, ROWS, KROWS, true> {
    typedef typename Core::Value type[ROWS][Core::BK + Core::PAD];
};

// The value a core keeps of an operand element in shared memory: itself, or (Core::ROUNDS: Tf32)
// Core::stored(x), its TF32 rounding, formed once per element a block loads.
template <class Core>
__device__ __forceinline__ typename Core::Value landed(typename Core::Value x) {
    if constexpr (Core::ROUNDS) return Core::stored(x);
    else return x;
}

// One operand of the main loop, by kind (operand_kind): a functor (fetched into registers one
// tile ahead, stored after the multiply), Direct (cp.async into the stage S - 1 tiles ahead), or
// Transformed (Direct, and f applied by each thread to its own copies one tile ahead). With a
// core that ROUNDS, each element is stored as landed<Core>(x): a functor's as it is stored,
// a copied one by its thread once it has landed (transform: one tile ahead, as f). round set
// false leaves the stage raw (round_own rounds the thread's slots later: gemm_mainloop's hook).
template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS, typename Op, class Core,
          int KIND = operand_kind<Op>::value>
struct Operand {
    typedef TileFetch<T, ROWS, BK, PAD, KROWS, THREADS, Core::ROW_TILES && !KROWS> Fetch;
    typedef typename Fetch::Tile Tile;
    static const bool TRANSFORMS = false, LANDS = false;
    bool round = true;
    Fetch regs;
    Op load;
    __device__ __forceinline__ explicit Operand(Op op) : load(op) {}
    __device__ __forceinline__ void issue(Tile&, Tile&, index_t, index_t, index_t, index_t, int) {}
    __device__ __forceinline__ void fetch(index_t r0, index_t k0, index_t R, index_t K, int tid) {
        regs.fetch(load, r0, k0, R, K, tid);
    }
    __device__ __forceinline__ void store(Tile& tile, int tid) const {
        if (Core::ROUNDS && round) regs.store(tile, tid, [](T v) { return landed<Core>(v); });
        else regs.store(tile, tid, [](T v) { return v; });
    }
    __device__ __forceinline__ void transform(Tile&, const Tile&, index_t, index_t, index_t, index_t, int) {}
    __device__ __forceinline__ void round_own(Tile& tile, int tid) const {
        Fetch::apply(tile, tid, [](T v) { return landed<Core>(v); });
    }
};

template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS, typename Op, class Core>
struct Operand<T, ROWS, BK, PAD, KROWS, THREADS, Op, Core, 1> {
    static const bool ROW_MAJOR = Core::ROW_TILES && !KROWS;  // kept m-major in shared memory (RowTileCopy)
    typedef typename Select<ROW_MAJOR, RowTileCopy<T, ROWS, BK, PAD, THREADS>,
                            TileCopy<T, ROWS, BK, PAD, KROWS, THREADS>>::type Copy;
    typedef typename Copy::Tile Tile;
    static const bool TRANSFORMS = false, LANDS = Core::ROUNDS;
    bool round = true;
    Op op;
    bool wide_ok;  // the 16-byte copies' global side aligned: every row start a multiple of 16 bytes
    __device__ __forceinline__ explicit Operand(Op o) : op(o), wide_ok(aligned16(o.p) && o.ld % Copy::VEC == 0) {}
    __device__ __forceinline__ void issue(Tile& tile, Tile&, index_t r0, index_t k0, index_t R, index_t K, int tid) {
        Copy::issue(tile, op.p, op.ld, wide_ok, r0, k0, R, K, tid);
    }
    __device__ __forceinline__ void fetch(index_t, index_t, index_t, index_t, int) {}
    __device__ __forceinline__ void store(Tile&, int) const {}
    __device__ __forceinline__ void transform(Tile& tile, const Tile&, index_t, index_t, index_t, index_t, int tid) {
        if constexpr (Core::ROUNDS)
            if (round) round_own(tile, tid);
    }
    __device__ __forceinline__ void round_own(Tile& tile, int tid) const {
        if constexpr (Core::ROUNDS) Copy::apply(tile, [](T v) { return landed<Core>(v); }, tid);
    }
};

template <typename T, int ROWS, int BK, int PAD, bool KROWS, int THREADS, typename Op, class Core>
struct Operand<T, ROWS, BK, PAD, KROWS, THREADS, Op, Core, 2> {
    typedef TileCopy<T, ROWS, BK, PAD, KROWS, THREADS> Copy;
    typedef T Tile[BK][ROWS + PAD];
    static_assert(!(Core::ROW_TILES && !KROWS), "row tiles: no Transformed operand (Direct and functor ones only)");
    static const bool TRANSFORMS = true, LANDS = true;
    bool round = true;
    Op op;
    bool wide_ok;
    __device__ __forceinline__ explicit Operand(Op o)
        : op(o), wide_ok(aligned16(o.p) && aligned16(o.aux) && o.ld % Copy::VEC == 0) {}
    __device__ __forceinline__ void issue(Tile& tile, Tile& aux, index_t r0, index_t k0, index_t R, index_t K,
                                          int tid) {
        Copy::issue(tile, op.p, op.ld, wide_ok, r0, k0, R, K, tid);
        Copy::issue(aux, op.aux, op.ld, wide_ok, r0, k0, R, K, tid);
    }
    __device__ __forceinline__ void fetch(index_t, index_t, index_t, index_t, int) {}
    __device__ __forceinline__ void store(Tile&, int) const {}
    __device__ __forceinline__ void transform(Tile& tile, const Tile& aux, index_t r0, index_t k0, index_t R,
                                              index_t K, int tid) {
        if (Core::ROUNDS && round) {  // f, then the rounding, in one pass (outside R x K: zeros, left)
            auto f = [&](T v, T w, index_t r, index_t k) { return landed<Core>(op.f(v, w, r, k)); };
            Copy::transform(tile, aux, f, r0, k0, R, K, tid);
        } else {
            Copy::transform(tile, aux, op.f, r0, k0, R, K, tid);
        }
    }
    __device__ __forceinline__ void round_own(Tile& tile, int tid) const {
        Copy::apply(tile, [](T v) { return landed<Core>(v); }, tid);
    }
};

// Whether a prologue fits beside the core's accumulators: a thread of 128 accumulators (the wide
// warp tiles) has no registers left for its tile in flight, in registers or transformed in shared
// memory (ptxas spills either way).
template <class Core>
struct prologue_room {
    static const bool value = sizeof(typename Core::Acc) / sizeof(typename Core::Value) <= 64;
};

// The shared-memory tiles of one block, declared by each kernel (`__shared__ GemmTiles<Core>
// tiles;`) and handed to the tile functions: STAGES stages of an A and a B tile (and with AUX, of
// a Transformed B operand's second source), as many as the core asks for and SHARED_BUDGET
// holds. FITS: at least two do.
template <class Core, bool AUX_ = false, bool A_KROWS_ = true, bool B_KROWS_ = true>
struct GemmTiles {
    typedef typename Core::Value T;
    static const bool AUX = AUX_, A_KROWS = A_KROWS_, B_KROWS = B_KROWS_;
    typedef typename TileOf<Core, Core::BM, A_KROWS>::type ATile;  // (A_KROWS, B_KROWS: the operands'
    typedef typename TileOf<Core, Core::BN, B_KROWS>::type BTile;  //  storage, for a ROW_TILES core)
    static const int STAGE_BYTES = (int)(sizeof(ATile) + (AUX ? 2 : 1) * sizeof(BTile));
    static const int FIT = SHARED_BUDGET / STAGE_BYTES;
    static const int STAGES = Core::STAGES < FIT ? Core::STAGES : FIT;
    static const bool FITS = STAGES >= 2;
    static const int S = STAGES > 0 ? STAGES : 1;
    alignas(16) ATile A[S];  // 16-byte aligned: Warp reads vectors
    alignas(16) BTile B[S];
    alignas(16) T Aux[AUX ? S : 1][Core::BK][AUX ? Core::BN + Core::PAD : 1];
};

// The main loop every core shares, over k in [k_begin, K) (a split-K slice takes part of K), a
// ring of STAGES tile pairs in shared memory (CUTLASS's multistage mainloop):
//
//   tiles 0 .. S-2 issued;  then for each k tile t:
//     wait until tile t has landed (cp.async.wait_group S-2), barrier   <- the one barrier
//     issue tile t + S - 1 into the stage tile t - 1 used (every thread is past it: the barrier)
//     multiply tile t (hook first: on_tile(B) sees each B tile once, in shared memory)
//
// Direct operands go by cp.async S - 1 tiles ahead. A functor operand is fetched into registers
// during tile t's multiply and stored into stage t + 1 after it (that stage was last read in
// iteration t + 1 - S <= t - 1, before the barrier). A Transformed B operand is copied like a
// Direct one; after tile t's multiply each thread waits for its own copies of tile t + 1 and
// applies the prologue to them in place, so the next barrier publishes tile t + 1 transformed.
// Every element is loaded exactly once (a prologue's side effect too). Elements outside
// M x N x K load as zero.
//
// A core that ROUNDS (Tf32) has each element rounded to TF32 in shared memory once, by the thread
// that stored or copied it, where a Transformed operand applies f (one tile ahead: after each wait
// for its own copies), so multiply reads the rounded bits with no conversion. raw_b_hook: the
// hook needs B's stage raw (weight_grad's bias sums, in float): there, B is rounded after the
// hook instead, between two more barriers (uniform: the argument is the same for the block).
template <class Core, bool A_KROWS, bool B_KROWS, class Tiles, typename Acc, typename OpA, typename OpB,
          typename OnTile>
__device__ __forceinline__ void gemm_mainloop(Acc& acc, Tiles& tiles, OpA op_a, OpB op_b, OnTile on_tile,
                                              index_t m0, index_t n0, index_t M, index_t N, index_t K,
                                              index_t k_begin = 0, bool raw_b_hook = false) {
    typedef typename Core::Value T;
    const int S = Tiles::STAGES, BK = Core::BK, tid = threadIdx.x;
    static_assert(S >= 2, "a stage in use and one filling (GemmTiles::FITS)");
    typedef Operand<T, Core::BM, BK, Core::PAD, A_KROWS, Core::THREADS, OpA, Core> OperandA;
    typedef Operand<T, Core::BN, BK, Core::PAD, B_KROWS, Core::THREADS, OpB, Core> OperandB;
    static_assert(!OperandA::TRANSFORMS, "only a B operand may be Transformed");
    static_assert(!OperandB::TRANSFORMS || Tiles::AUX, "a Transformed operand needs GemmTiles<Core, true>");
    static_assert(!Core::ROW_TILES || (Tiles::A_KROWS == A_KROWS && Tiles::B_KROWS == B_KROWS),
                  "a ROW_TILES core's GemmTiles are declared with the operands' layouts");
    const bool round_late = Core::ROUNDS && raw_b_hook;  // B rounded after the hook, not as it lands
    OperandA a(op_a);
    OperandB b(op_b);
    b.round = !round_late;
    const bool LANDS = OperandA::LANDS || OperandB::LANDS;  // a thread works on its own copies once they land
    auto aux = [&](int s) -> auto& {
        if constexpr (Tiles::AUX) return tiles.Aux[s];
        else return tiles.B[s];  // unused: only a Transformed operand reads its aux tile
    };
    const index_t n_tiles = K > k_begin ? (K - k_begin + BK - 1) / BK : 0;
    Core::zero(acc);
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < n_tiles) {
            a.issue(tiles.A[s], tiles.A[s], m0, k_begin + s * BK, M, K, tid);
            b.issue(tiles.B[s], aux(s), n0, k_begin + s * BK, N, K, tid);
        }
        cp_async_commit();  // one group per tile, empty or not: the waits below count groups
    }
    if (n_tiles > 0) {
        a.fetch(m0, k_begin, M, K, tid);
        b.fetch(n0, k_begin, N, K, tid);
        a.store(tiles.A[0], tid);
        b.store(tiles.B[0], tid);
        if (LANDS) {
            cp_async_wait<S - 2>();  // this thread's copies of tile 0
            a.transform(tiles.A[0], tiles.A[0], m0, k_begin, M, K, tid);
            b.transform(tiles.B[0], aux(0), n0, k_begin, N, K, tid);
        }
    }
    int stage = 0;
    for (index_t t = 0; t < n_tiles; ++t) {
        cp_async_wait<S - 2>();  // this thread's copies of tile t have landed
        __syncthreads();         // sync: tile t in shared memory, tile t - 1 consumed
        const index_t ahead = t + S - 1;
        const int ahead_stage = stage == 0 ? S - 1 : stage - 1;
        if (ahead < n_tiles) {
            a.issue(tiles.A[ahead_stage], tiles.A[ahead_stage], m0, k_begin + ahead * BK, M, K, tid);
            b.issue(tiles.B[ahead_stage], aux(ahead_stage), n0, k_begin + ahead * BK, N, K, tid);
        }
        cp_async_commit();
        const bool more = t + 1 < n_tiles;
        if (more) {
            a.fetch(m0, k_begin + (t + 1) * BK, M, K, tid);
            b.fetch(n0, k_begin + (t + 1) * BK, N, K, tid);
        }
        on_tile(tiles.B[stage]);
        if constexpr (Core::ROUNDS)
            if (round_late) {
                __syncthreads();  // sync: the hook has read tile t raw
                b.round_own(tiles.B[stage], tid);
                __syncthreads();  // sync: tile t rounded
            }
        Core::multiply(acc, tiles.A[stage], tiles.B[stage]);
        const int next_stage = stage + 1 == S ? 0 : stage + 1;
        if (more) {
            a.store(tiles.A[next_stage], tid);
            b.store(tiles.B[next_stage], tid);
            if (LANDS) {
                cp_async_wait<S - 2>();  // this thread's copies of tile t + 1 (tiles up to t + S - 1 issued)
                a.transform(tiles.A[next_stage], tiles.A[next_stage], m0, k_begin + (t + 1) * BK, M, K, tid);
                b.transform(tiles.B[next_stage], aux(next_stage), n0, k_begin + (t + 1) * BK, N, K, tid);
            }
        }
        stage = next_stage;
    }
    cp_async_wait<0>();  // only empty groups are left: nothing lands after the loop
}

template <typename T, int BM_, int BN_, int BK_, int TM, int TN>
struct Simt {
    static const int BM = BM_, BN = BN_, BK = BK_, PAD = 1, STAGES = 2, MIN_BLOCKS = 1;
    static const bool ROUNDS = false;  // operands kept in shared memory as loaded (gemm_mainloop)
    static const bool ROW_TILES = false;  // every tile k-major in shared memory (TileOf)
    static const bool STAGED = false;     // the epilogue from registers (tile_epilogue)
    static const int THREADS = (BM / TM) * (BN / TN);  // the launchers' block (ops/cuda.py threads_of)
    static const int ROW_STEP = BM / TM;  // rows of one thread are ROW_STEP apart
    static const int COL_STEP = BN / TN;
    static_assert(BM % TM == 0 && BN % TN == 0, "a thread's outputs must tile the block tile");
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 1024 threads");
    static_assert(BN <= THREADS, "weight_grad sums one bias column per thread");
    typedef T Value;
    struct Acc {
        T v[TM][TN];
    };

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc.v[i][j] = T(0);
    }

    // One BK-deep step of the product from the tiles in shared memory.
    static __device__ __forceinline__ void multiply(Acc& acc, const T (&As)[BK][BM + PAD],
                                                    const T (&Bs)[BK][BN + PAD]) {
        const int tx = threadIdx.x % COL_STEP, ty = threadIdx.x / COL_STEP;
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * ROW_STEP];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * COL_STEP];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc.v[i][j] += a[i] * b[j];
        }
    }

    // epilogue(m, n, value) for each of this thread's outputs inside M x N.
    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int tx = threadIdx.x % COL_STEP, ty = threadIdx.x / COL_STEP;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const index_t m = m0 + ty + i * ROW_STEP;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const index_t n = n0 + tx + j * COL_STEP;
                if (m < M && n < N) epilogue(m, n, acc.v[i][j]);
            }
        }
    }
};

// Warp tiles (siboehm's SGEMM kernel 10, CUTLASS's SIMT warp level): warp w owns a WM x WN
// sub-tile of the block's BM x BN, cut into WMITER x WNITER pieces; in each piece a lane owns
// TM consecutive rows and TN consecutive columns, so its fragments are contiguous in shared
// memory and read as 16-byte vectors (ld.shared.v4.f32: TM/4 + TN/4 loads per TM x TN FMAs for
// float, where Simt reads TM + TN scalars strided). PAD keeps every tile row 16-byte aligned
// (GemmTiles is 16-byte aligned); the fetch's scalar stores are conflict-free with it (row
// stride BM + 4 words: 8 k-rows x 4 m land on 32 banks).
//
// STAGES_: the most tile pairs in flight (GemmTiles takes as many as fit SHARED_BUDGET: static
// shared memory is 48 KB a block; the rest is the kernels' own: block sums, flags). MIN_BLOCKS_: blocks per SM the
// registers must allow in float (__launch_bounds__ of every GEMM kernel: at most
// 65536 / (THREADS MIN_BLOCKS) registers a thread); double's accumulators take twice the registers: 1.
template <typename T, int BM_, int BN_, int BK_, int WM, int WN, int WMITER, int WNITER, int TM, int TN,
          int STAGES_ = 2, int MIN_BLOCKS_ = 1>
struct Warp {
    static const int BM = BM_, BN = BN_, BK = BK_, PAD = 16 / sizeof(T);
    static const int STAGES = STAGES_, MIN_BLOCKS = sizeof(T) == 4 ? MIN_BLOCKS_ : 1;
    static const bool ROUNDS = false, ROW_TILES = false, STAGED = false;
    static const int THREADS = (BM / WM) * (BN / WN) * 32;  // the launchers' block (ops/cuda.py threads_of)
    static const int WSUBM = WM / WMITER, WSUBN = WN / WNITER;  // one piece of a warp's sub-tile
    static const int LANES_N = WSUBN / TN, LANES_M = WSUBM / TM;
    static const int VEC = 16 / sizeof(T);                      // elements of one 16-byte shared load
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % WMITER == 0 && WN % WNITER == 0, "warp tiling");
    static_assert(LANES_M * LANES_N == 32, "a piece is TM x TN per lane over the 32 lanes");
    static_assert(TM % VEC == 0 && TN % VEC == 0, "fragments read as whole 16-byte vectors");
    static_assert(THREADS <= 1024 && BN <= THREADS, "at most 1024 threads; one bias column per thread");
    static_assert((BM + PAD) * sizeof(T) % 16 == 0 && (BN + PAD) * sizeof(T) % 16 == 0 &&
                      WSUBM * sizeof(T) % 16 == 0 && WSUBN * sizeof(T) % 16 == 0,
                  "every fragment starts 16-byte aligned");
    typedef T Value;
    struct Acc {
        T v[WMITER * TM][WNITER * TN];
    };

    // The first row and column of this lane's fragments in the block tile.
    static __device__ __forceinline__ int row0() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        return (warp / (BN / WN)) * WM + (lane / LANES_N) * TM;
    }
    static __device__ __forceinline__ int col0() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        return (warp % (BN / WN)) * WN + (lane % LANES_N) * TN;
    }

    static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < WMITER * TM; ++i)
#pragma unroll
            for (int j = 0; j < WNITER * TN; ++j) acc.v[i][j] = T(0);
    }

    // COUNT consecutive elements of shared memory (16-byte aligned) into registers, a vector at a time.
    template <int COUNT>
    static __device__ __forceinline__ void load_vectors(T* dst, const T* src) {
#pragma unroll
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
        if (reinterpret_cast<unsigned long long>(src) % 16) __trap();  // a GPU faults on a misaligned vector
#endif
        for (int p = 0; p < COUNT / VEC; ++p) {
            const Pack<T> v = reinterpret_cast<const Pack<T>*>(src)[p];
#pragma unroll
            for (int e = 0; e < VEC; ++e) dst[p * VEC + e] = v.v[e];
        }
    }

    static __device__ __forceinline__ void multiply(Acc& acc, const T (&As)[BK][BM + PAD],
                                                    const T (&Bs)[BK][BN + PAD]) {
        const int m0 = row0(), n0 = col0();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[WMITER * TM], b[WNITER * TN];
#pragma unroll
            for (int i = 0; i < WMITER; ++i) load_vectors<TM>(a + i * TM, &As[kk][m0 + i * WSUBM]);
#pragma unroll
            for (int j = 0; j < WNITER; ++j) load_vectors<TN>(b + j * TN, &Bs[kk][n0 + j * WSUBN]);
#pragma unroll
            for (int i = 0; i < WMITER * TM; ++i)
#pragma unroll
                for (int j = 0; j < WNITER * TN; ++j) acc.v[i][j] += a[i] * b[j];
        }
    }

    template <typename Epilogue>
    static __device__ __forceinline__ void for_each_output(const Acc& acc, index_t m0, index_t n0, index_t M,
                                                           index_t N, Epilogue epilogue) {
        const int r0 = row0(), c0 = col0();
#pragma unroll
        for (int i = 0; i < WMITER * TM; ++i) {
            const index_t m = m0 + r0 + (i / TM) * WSUBM + i % TM;
#pragma unroll
            for (int j = 0; j < WNITER * TN; ++j) {
                const index_t n = n0 + c0 + (j / TN) * WSUBN + j % TN;
                if (m < M && n < N) epilogue(m, n, acc.v[i][j]);
            }
        }
    }
};

#include "gemm_tf32.cuh"
#include "gemm_bf16.cuh"

// The epilogue of a block's tile: epilogue(m, n, value) for each of its outputs inside M x N, after the
// main loop. Core::for_each_output calls it from the accumulators, the code inlined once per
// accumulator of a thread; a STAGED core (Bf16: 128 accumulators a thread, where an activation's code
// 128 times over took nvcc 28 s for one forward kernel) passes them through shared memory, `staging`:
// the block's tiles (Tiles), free once the main loop is done, and runs the epilogue in a loop.
template <class Core, class Tiles, typename Epilogue>
__device__ __forceinline__ void tile_epilogue(const typename Core::Acc& acc, Tiles& staging, index_t m0, index_t n0,
                                              index_t M, index_t N, Epilogue epilogue) {
    if constexpr (Core::STAGED) {
        static_assert(sizeof(Tiles) >= Core::STAGING_BYTES, "the staged epilogue's half tile fits the tiles' memory");
        Core::for_each_output_staged(acc, reinterpret_cast<float*>(&staging), m0, n0, M, N, epilogue);
    } else {
        Core::for_each_output(acc, m0, n0, M, N, epilogue);
    }
}

struct NoTileHook {
    template <typename Tile>
    __device__ __forceinline__ void operator()(const Tile&) const {}
};
