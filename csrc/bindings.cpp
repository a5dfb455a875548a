// The one bindings file: op schemas for torch.library, and a pybind11 module reporting how _C was built.
// Each op is declared once here; its device kernels register their implementations under the CPU and CUDA
// dispatch keys with TORCH_LIBRARY_IMPL next to their sources (the CUDA ones only in a CUDA build).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(flagdit_kernels, m) {
  // Packs latents (C, [F,] H, W) into (total_tokens, C*p*p) token rows; zeros at placeholder rows. Every op
  // takes the token order's tile (csrc/token_layout.h): [] raster, [t, h, w] tile-major.
  m.def(
      "pack_patches(Tensor[] latents, int patch_size, bool nextline, bool nextframe, bool channels_last, "
      "SymInt total_tokens, int[] tile=[]) -> Tensor");
  // pack_patches plus the token layout from the same pass: (patches, positions int32 (T, 3), kind int8 (T,),
  // patch_rows int64 (N,), cu_seqlens int32 (B+1,)). fk.pack uses it on the compiled backends.
  m.def(
      "pack_patches_layout(Tensor[] latents, int patch_size, bool nextline, bool nextframe, bool channels_last, "
      "int[] tile=[]) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Reads token rows (T, C*p*p) back into latents; item_shapes holds (ndim, F, H, W) per item.
  m.def(
      "unpack_patches(Tensor tokens, int[] item_shapes, int patch_size, int channels, bool nextline, "
      "bool nextframe, bool channels_last, int[] tile=[]) -> Tensor[]");
  // RMSNorm over the last dim (the "cpu" and "cuda" backends of fk.rms_norm: csrc/rms_norm_cpu.cpp,
  // csrc/rms_norm_cuda.cu): (y, rstd fp32 per row). The backward returns (dx, dweight), dweight an empty (0,)
  // tensor when weight is None. Fake impls and autograd live in flagdit_kernels/ops/norms.py.
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FLAGDIT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flagdit_kernels compiled ops (registered under torch.ops.flagdit_kernels)";
  m.def("build_info", &build_info, "How this extension was built: {'cuda': bool, 'torch': str}");
}
