// The one assertion of the torch-free core tests: EXPECT(cond, printf-format, ...) reports a
// failure with its location and counts it in `failures`; main() returns failures != 0.
#pragma once
#include <cstdio>

static int failures = 0;

#define EXPECT(cond, ...)                                \
  do {                                                   \
    if (!(cond)) {                                       \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
      std::printf(__VA_ARGS__);                          \
      std::printf("\n");                                 \
      ++failures;                                        \
    }                                                    \
  } while (0)
