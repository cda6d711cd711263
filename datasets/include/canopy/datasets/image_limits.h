// The largest image decode_image takes by default (images.h), in a header of its own so that
// the configuration's default can name it without LibTorch's headers.
#pragma once

#include <cstdint>

namespace canopy::datasets {

// 2 x PIL's Image.MAX_IMAGE_PIXELS: where PIL raises DecompressionBombError.
constexpr std::int64_t kDefaultMaxImagePixels = 178956970;

}  // namespace canopy::datasets
