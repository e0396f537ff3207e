// Per-token run mean on the CPU: the XLA FFI handler behind atpo_jax.kernels.turns.per_token_run_mean.
//
// For every row of `values` (all leading axes flattened; the last axis has length L) and every maximal
// run [a, b) of non-zero `mask` entries in that row:
//
//     mean[a:b] = (sum_{t in [a, b)} values[t]) / (b - a)          mean = 0 outside every run
//     num_runs  = number of such runs in the row
//
// Values outside runs are never read into a sum, so NaN/inf there cannot leak. Sums accumulate in
// double in a fixed order (8 interleaved partial sums), so results are deterministic and at least as
// accurate as an f32 segment sum. Rows are split into chunks that the calling thread and XLA's
// intra-op thread pool work through together; the calling thread never waits on a task that has not
// started, so a busy or missing pool cannot deadlock it.
//
// Why a hand-written kernel: on XLA:CPU the same result needs a prefix count plus scatter/gather
// (several ns per token); this is one streaming pass per row (benchmarks/kernels.py).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
double RunSum(const T* values, int64_t begin, int64_t end) {
  double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = begin;
  for (; t + 8 <= end; t += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += static_cast<double>(values[t + j]);
  }
  for (int j = 0; t < end; ++t, ++j) partial[j] += static_cast<double>(values[t]);
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename T, typename M>
void RunMeanRows(const T* values, const M* mask, T* mean, int32_t* num_runs, int64_t row_begin,
                 int64_t row_end, int64_t length) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* v = values + row * length;
    const M* m = mask + row * length;
    T* out = mean + row * length;
    int32_t runs = 0;
    int64_t t = 0;
    while (t < length) {
      int64_t gap_end = t;
      while (gap_end < length && !(m[gap_end] != M(0))) ++gap_end;
      std::fill(out + t, out + gap_end, T(0));
      if (gap_end == length) break;
      int64_t run_end = gap_end;
      while (run_end < length && m[run_end] != M(0)) ++run_end;
      const T run_mean = static_cast<T>(RunSum(v, gap_end, run_end) /
                                        static_cast<double>(run_end - gap_end));
      std::fill(out + gap_end, out + run_end, run_mean);
      ++runs;
      t = run_end;
    }
    num_runs[row] = runs;
  }
}

// Shared by the calling thread and the pool tasks of one ParallelChunks call.
struct ChunkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;
};

// Runs body(chunk) for chunk in [0, num_chunks) on the calling thread and up to one task per pool
// thread; returns when every chunk is done.
void ParallelChunks(ffi::ThreadPool& pool, int64_t num_chunks,
                    const std::function<void(int64_t)>& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), num_chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < num_chunks; ++c) body(c);
    return;
  }
  auto queue = std::make_shared<ChunkQueue>();
  // Tasks copy `body` only as a pointer; they call it only while chunks remain, i.e. before the
  // calling thread returns (it waits for every chunk to be done).
  const std::function<void(int64_t)>* body_ptr = &body;
  auto work = [queue, body_ptr, num_chunks]() {
    for (;;) {
      int64_t chunk = queue->next.fetch_add(1);
      if (chunk >= num_chunks) return;
      (*body_ptr)(chunk);
      if (queue->done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(queue->mu);
        queue->all_done.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->all_done.wait(lock, [&] { return queue->done.load() == num_chunks; });
}

template <typename T, typename M>
void Dispatch(ffi::ThreadPool& pool, const T* values, const M* mask, T* mean, int32_t* num_runs,
              int64_t rows, int64_t length) {
  // Below ~64k tokens the pool's start-up cost outweighs the work.
  constexpr int64_t kTokensPerChunk = 1 << 16;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kTokensPerChunk / std::max<int64_t>(length, 1));
  const int64_t num_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  ParallelChunks(pool, num_chunks, [&](int64_t chunk) {
    const int64_t begin = chunk * rows_per_chunk;
    RunMeanRows(values, mask, mean, num_runs, begin, std::min(rows, begin + rows_per_chunk), length);
  });
}

template <typename T>
ffi::Error DispatchMask(ffi::ThreadPool& pool, const ffi::AnyBuffer& values,
                        const ffi::AnyBuffer& mask, ffi::AnyBuffer& mean, int32_t* num_runs,
                        int64_t rows, int64_t length) {
  const T* v = values.typed_data<T>();
  T* out = mean.typed_data<T>();
  auto run = [&](auto* typed_mask) {
    Dispatch(pool, v, typed_mask, out, num_runs, rows, length);
    return ffi::Error::Success();
  };
  const void* m = mask.untyped_data();
  switch (mask.element_type()) {
    case ffi::DataType::PRED: return run(static_cast<const bool*>(m));
    case ffi::DataType::S8: return run(static_cast<const int8_t*>(m));
    case ffi::DataType::U8: return run(static_cast<const uint8_t*>(m));
    case ffi::DataType::S32: return run(static_cast<const int32_t*>(m));
    case ffi::DataType::S64: return run(static_cast<const int64_t*>(m));
    case ffi::DataType::F32: return run(static_cast<const float*>(m));
    case ffi::DataType::F64: return run(static_cast<const double*>(m));
    default:
      return ffi::Error::InvalidArgument(
          "atpo_run_mean: mask must be bool, int8, uint8, int32, int64, float32 or float64");
  }
}

ffi::Error RunMeanImpl(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::AnyBuffer mask,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::Buffer<ffi::S32>> num_runs) {
  auto dims = values.dimensions();
  if (dims.size() < 1) {
    return ffi::Error::InvalidArgument("atpo_run_mean: values must have rank >= 1");
  }
  auto mask_dims = mask.dimensions();
  if (mask_dims.size() != dims.size() || !std::equal(dims.begin(), dims.end(), mask_dims.begin())) {
    return ffi::Error::InvalidArgument("atpo_run_mean: mask and values must have the same shape");
  }
  if (mean->element_type() != values.element_type()) {
    return ffi::Error::InvalidArgument("atpo_run_mean: mean must have the dtype of values");
  }
  int64_t rows = 1;  // Every leading axis is a row axis (a vmapped call arrives as one call).
  for (size_t axis = 0; axis + 1 < dims.size(); ++axis) rows *= dims[axis];
  const int64_t length = dims.back();
  if (static_cast<int64_t>(num_runs->element_count()) != rows) {
    return ffi::Error::InvalidArgument("atpo_run_mean: num_runs must have one entry per row");
  }
  int32_t* runs = num_runs->typed_data();
  if (length == 0) {
    std::fill(runs, runs + rows, 0);
    return ffi::Error::Success();
  }
  switch (values.element_type()) {
    case ffi::DataType::F32:
      return DispatchMask<float>(pool, values, mask, *mean, runs, rows, length);
    case ffi::DataType::F64:
      return DispatchMask<double>(pool, values, mask, *mean, runs, rows, length);
    default:
      return ffi::Error::InvalidArgument("atpo_run_mean: values must be float32 or float64");
  }
}

}  // namespace

// Built with -fvisibility=hidden: export only the handler that Python looks up.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* AtpoRunMean(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AtpoRunMean, RunMeanImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
