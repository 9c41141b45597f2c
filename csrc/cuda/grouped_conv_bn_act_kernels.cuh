// conv_bn_act for ResNeXt-style grouped 3x3 convolutions (stride 1 or 2, padding 1,
// 4 to 32 input and output channels per group) on channels_last data.
//
// cuDNN runs such a convolution as many tiny per-group GEMMs, and is slow at it on
// channels_last data. Here one block computes an 8 x 8 tile of output pixels for a
// slab of GB whole groups (GB * C_out/groups <= 64 output channels): the input patch
// of the tile ((7 * stride + 3)^2 pixels) for all GB groups and all the slab's weights
// are staged in shared memory together, in chunks of KC input channels per group, and
// every thread accumulates a 4 x 4 micro-tile (pixels tr + 16 i, channels 4 tc + j)
// with SIMT FMA. Where C_out/groups is a multiple of 4 the four channels of a thread
// lie in one group and share their input values (kAligned); otherwise each channel
// reads its own. The epilogue is conv_bn_act_tile_epilogue.cuh's.
//
// Layouts: x [N, H, W, C_in] and the output [N, H_out, W_out, C_out] dense channels_last;
// weight [C_out, 3, 3, C_in/groups] (channels_last weights: the input channel fastest).
// GB and KC come from grouped_conv_plan(), which keeps the staged slices within the
// static shared arrays of GroupedConvConfig; launch only with a plan from it.
#pragma once

#include <cstdint>

#include "cuda/conv_bn_act_tile_epilogue.cuh"

namespace cnnkernels {
namespace conv_bn_act_cuda {

constexpr int kGroupedTile = 8;  // output pixels per block: kGroupedTile x kGroupedTile
static_assert(kGroupedTile * kGroupedTile == kConvTilePixels, "one micro-tile row per tile pixel");

// Shared-memory budget of one instantiation (static arrays, < 48 KB for every type).
template <typename acc_t, int kStride>
struct GroupedConvConfig {
  static constexpr int kPatch = (kGroupedTile - 1) * kStride + 3;  // input patch side
  static constexpr int kWide = sizeof(acc_t) > 4 ? 2 : 1;          // double halves the slices
  // Input channels staged per patch pixel (GB * KC <= kSlabIn) and per group (KC <= kChunk).
  static constexpr int kSlabIn = (kStride == 1 ? 32 : 16) / kWide;
  static constexpr int kChunk = 8 / kWide;
  static constexpr int kXStride = kSlabIn + 1;  // patch pixel stride in s_x (+1: banks)
  static constexpr int kXElements = kPatch * kPatch * kXStride;
  static constexpr int kWElements = kConvTileChannels * 9 * kChunk;
  static_assert(kXElements >= kConvLanes * kConvTileChannels + kConvTileChannels, "s_x doubles as scratch");
};

// Tensors of at most 2^30 elements (32-bit offsets).
struct GroupedConvGeometry {
  int n, c_in, h, w;
  int c_out, h_out, w_out;
  int groups, cin_g, cout_g;
  int stride;
  int groups_per_block;  // GB
  int chunk;             // KC
  int tiles_h, tiles_w;
  __host__ __device__ int pixel_tiles() const { return n * tiles_h * tiles_w; }
};

// The plan for x [n, c_in, h, w], weight [c_out, c_in / groups, 3, 3], stride 1 or 2.
template <typename acc_t>
GroupedConvGeometry grouped_conv_plan(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t groups,
                                      int stride) {
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  GroupedConvGeometry g{};
  g.n = i(n);
  g.c_in = i(c_in);
  g.h = i(h);
  g.w = i(w);
  g.c_out = i(c_out);
  g.groups = i(groups);
  g.cin_g = i(c_in / groups);
  g.cout_g = i(c_out / groups);
  g.stride = stride;
  g.h_out = (h - 1) / stride + 1;
  g.w_out = (w - 1) / stride + 1;
  g.tiles_h = (g.h_out + kGroupedTile - 1) / kGroupedTile;
  g.tiles_w = (g.w_out + kGroupedTile - 1) / kGroupedTile;
  const int slab_in = stride == 1 ? GroupedConvConfig<acc_t, 1>::kSlabIn : GroupedConvConfig<acc_t, 2>::kSlabIn;
  const int chunk_max = GroupedConvConfig<acc_t, 1>::kChunk;
  int gb = kConvTileChannels / g.cout_g;
  if (gb > slab_in) gb = slab_in;
  if (gb > g.groups) gb = g.groups;
  if (gb < 1) gb = 1;
  int kc = g.cin_g;
  if (kc > slab_in / gb) kc = slab_in / gb;
  if (kc > chunk_max) kc = chunk_max;
  g.groups_per_block = gb;
  g.chunk = kc;
  return g;
}

// Grid (pixel tiles, group slabs); the pixel tiles are the P of the training partials.
inline dim3 grouped_conv_grid(const GroupedConvGeometry& g) {
  return dim3(static_cast<unsigned int>(g.pixel_tiles()),
              static_cast<unsigned int>((g.groups + g.groups_per_block - 1) / g.groups_per_block));
}

// Block kConvThreads, grid grouped_conv_grid(g), g from grouped_conv_plan<acc_t> with
// g.stride == kStride; kAligned requires g.cout_g % 4 == 0.
template <typename scalar_t, typename acc_t, int kStride, bool kTraining, bool kAligned>
__global__ void CNNKERNELS_LAUNCH_BOUNDS(kConvThreads)
    grouped_conv_bn_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                               GroupedConvGeometry g, TileEpilogue<scalar_t, acc_t> e) {
  using Config = GroupedConvConfig<acc_t, kStride>;
  constexpr int kPatch = Config::kPatch, kXStride = Config::kXStride;
  __shared__ acc_t s_x[Config::kXElements];  // [patch pixel][slab input channel gl * KC + kc]
  __shared__ acc_t s_w[Config::kWElements];  // [kc][tap][slot], slot = (col % 4) * 16 + col / 4

  const int tid = threadIdx.x;
  const int tr = tid / kConvLanes, tc = tid % kConvLanes;
  const int tile = blockIdx.x;
  const int n = tile / (g.tiles_h * g.tiles_w);
  const int h0 = tile / g.tiles_w % g.tiles_h * kGroupedTile;
  const int w0 = tile % g.tiles_w * kGroupedTile;
  const int g0 = blockIdx.y * g.groups_per_block;
  const int gb = g.groups - g0 < g.groups_per_block ? g.groups - g0 : g.groups_per_block;
  const int cout_g = g.cout_g, cin_g = g.cin_g, kc_max = g.chunk;
  const int slab_out = gb * cout_g;  // real output channels of this block
  const int slab_cols = g.groups_per_block * kc_max;
  const int h_in0 = h0 * kStride - 1, w_in0 = w0 * kStride - 1;
  const scalar_t* x_image = x + n * g.h * g.w * g.c_in + g0 * cin_g;  // + pixel offset + channel in slab

  // Micro-tile: pixels p = tr + 16 i of the tile (row p / 8, column p % 8 = tr % 8), and
  // local channels col = 4 tc + j of group gl[j] (clamped into the slab for the columns
  // beyond it, whose results are discarded).
  int patch_base[kConvMicro];
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
    const int p = tr + kConvLanes * i;
    patch_base[i] = ((p / kGroupedTile) * kPatch + p % kGroupedTile) * kStride;
  }
  int x_col[kConvMicro];  // gl[j] * KC: the group's first slab input channel
#pragma unroll
  for (int j = 0; j < kConvMicro; ++j) {
    int gl = (kConvMicro * tc + j) / cout_g;
    if (gl > gb - 1) gl = gb - 1;
    x_col[j] = gl * kc_max;
  }

  acc_t acc[kConvMicro][kConvMicro];
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kConvMicro; ++j) acc[i][j] = acc_t(0);
  }

  for (int ci0 = 0; ci0 < cin_g; ci0 += kc_max) {
    const int kc_here = cin_g - ci0 < kc_max ? cin_g - ci0 : kc_max;
    // Stage the patch: zeros for padding, for channels past the group's last and for
    // groups past the slab.
    for (int index = tid; index < kPatch * kPatch * slab_cols; index += kConvThreads) {
      const int pixel = index / slab_cols, q = index % slab_cols;
      const int gl = q / kc_max, kc = q % kc_max;
      const int hi = h_in0 + pixel / kPatch, wi = w_in0 + pixel % kPatch;
      acc_t v = acc_t(0);
      if (gl < gb && kc < kc_here && hi >= 0 && hi < g.h && wi >= 0 && wi < g.w) {
        v = load_acc<acc_t>(x_image + (hi * g.w + wi) * g.c_in + gl * cin_g + ci0 + kc);
      }
      s_x[pixel * kXStride + q] = v;
    }
    // Stage the weights of all 64 slots (zeros past the slab or the group's channels).
    for (int index = tid; index < kConvTileChannels * 9 * kc_max; index += kConvThreads) {
      const int col = index / (9 * kc_max), rest = index % (9 * kc_max);
      const int tap = rest / kc_max, kc = rest % kc_max;
      acc_t v = acc_t(0);
      if (col < slab_out && kc < kc_here) {
        v = load_acc<acc_t>(weight + ((g0 * cout_g + col) * 9 + tap) * cin_g + ci0 + kc);
      }
      s_w[(kc * 9 + tap) * kConvTileChannels + (col % kConvMicro) * kConvLanes + col / kConvMicro] = v;
    }
    __syncthreads();
    for (int kc = 0; kc < kc_here; ++kc) {
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) {
        const int shift = (tap / 3) * kPatch + tap % 3;
        acc_t wv[kConvMicro];
#pragma unroll
        for (int j = 0; j < kConvMicro; ++j) wv[j] = s_w[(kc * 9 + tap) * kConvTileChannels + j * kConvLanes + tc];
#pragma unroll
        for (int i = 0; i < kConvMicro; ++i) {
          const int x_at = (patch_base[i] + shift) * kXStride + kc;
          if constexpr (kAligned) {
            const acc_t xv = s_x[x_at + x_col[0]];
#pragma unroll
            for (int j = 0; j < kConvMicro; ++j) acc[i][j] += xv * wv[j];
          } else {
#pragma unroll
            for (int j = 0; j < kConvMicro; ++j) acc[i][j] += s_x[x_at + x_col[j]] * wv[j];
          }
        }
      }
    }
    __syncthreads();
  }

  TilePlace at;
#pragma unroll
  for (int i = 0; i < kConvMicro; ++i) {
    const int p = tr + kConvLanes * i;
    const int ho = h0 + p / kGroupedTile, wo = w0 + p % kGroupedTile;
    at.m[i] = (ho < g.h_out && wo < g.w_out) ? (n * g.h_out + ho) * g.w_out + wo : -1;
    at.col[i] = kConvMicro * tc + i;
  }
  const int rows = g.h_out - h0 < kGroupedTile ? g.h_out - h0 : kGroupedTile;
  const int cols = g.w_out - w0 < kGroupedTile ? g.w_out - w0 : kGroupedTile;
  at.base_channel = g0 * cout_g;
  at.channels_in_tile = slab_out;
  at.pixels_in_tile = rows * cols;
  at.tile = tile;
  at.writes_count = blockIdx.y == 0;
  if constexpr (kTraining) {
    training_epilogue<scalar_t>(acc, at, e, s_x);
  } else {
    eval_epilogue<scalar_t>(acc, at, e);
  }
}

// Calls launch(kernel) with the instantiation of grouped_conv_bn_act_kernel for g.
template <typename scalar_t, typename acc_t, bool kTraining, typename Launch>
void with_grouped_conv_kernel(const GroupedConvGeometry& g, Launch&& launch) {
  const bool aligned = g.cout_g % kConvMicro == 0;
  if (g.stride == 1) {
    if (aligned) launch(grouped_conv_bn_act_kernel<scalar_t, acc_t, 1, kTraining, true>);
    else launch(grouped_conv_bn_act_kernel<scalar_t, acc_t, 1, kTraining, false>);
  } else {
    if (aligned) launch(grouped_conv_bn_act_kernel<scalar_t, acc_t, 2, kTraining, true>);
    else launch(grouped_conv_bn_act_kernel<scalar_t, acc_t, 2, kTraining, false>);
  }
}

}  // namespace conv_bn_act_cuda
}  // namespace cnnkernels
