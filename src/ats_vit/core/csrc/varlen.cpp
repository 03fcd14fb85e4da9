// ats_vit::varlen_attention(q, k, v, cu_q, cu_k, scale): softmax attention of each image's queries
// over its own keys, images packed flat without padding: q (Tq, H, d), k and v (Tk, H, d), image b
// owning rows cu_q[b]..cu_q[b+1] of q and cu_k[b]..cu_k[b+1] of k and v; (Tq, H, d) out.
//
// PyTorch 2.14 has variable-length attention on CUDA only. Here each image's rows, viewed as
// (1, H, n, d) without a copy, go through ATen's own CPU flash-attention kernel, images in
// parallel (the kernel runs serially inside each worker), so the result is bit for bit what a
// Python loop of scaled_dot_product_attention over the images gives (its twin,
// ats_vit.core.block.varlen_attention_reference) without padding or the loop's per-call cost.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace {

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen_attention: q, k, v must be (T, H, d)");
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1, "varlen_attention: cu_q and cu_k must match");
  const auto cq = cu_q.to(at::kLong).contiguous(), ck = cu_k.to(at::kLong).contiguous();
  const int64_t* a = cq.data_ptr<int64_t>();
  const int64_t* b = ck.data_ptr<int64_t>();
  const int64_t B = cq.numel() - 1;
  auto out = at::empty_like(q);
  // The workers run tensor operations, so they take the caller's thread-local state (inference
  // mode, grad mode, dispatch keys): without it a copy into `out` made under inference_mode fails.
  const at::ThreadLocalState caller;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state(caller);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t nq = a[i + 1] - a[i], nk = b[i + 1] - b[i];
      if (nq == 0) continue;
      auto rows = [](const at::Tensor& t, int64_t start, int64_t n) {
        return t.narrow(0, start, n).transpose(0, 1).unsqueeze(0);  // (1, H, n, d), a view
      };
      auto o = at::scaled_dot_product_attention(rows(q, a[i], nq), rows(k, b[i], nk), rows(v, b[i], nk), {}, 0.0,
                                                false, scale);
      rows(out, a[i], nq).copy_(o);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ats_vit, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ats_vit, CPU, m) {
  m.impl("varlen_attention", &varlen_attention);
}
