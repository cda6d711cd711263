// Which sanitizer this translation unit is built under: GCC says so by macros, Clang by
// __has_feature. CANOPY_TSAN for ThreadSanitizer, CANOPY_ASAN for AddressSanitizer.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define CANOPY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CANOPY_TSAN 1
#endif
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CANOPY_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CANOPY_ASAN 1
#endif
#endif
