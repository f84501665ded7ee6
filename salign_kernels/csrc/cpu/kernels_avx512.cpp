// The matching kernels built for the AVX512 CPU capability: the build (salign_kernels/_build.py)
// compiles this file with that capability's flags and -DCPU_CAPABILITY=AVX512. The code is in variant.h.
#include "cpu/variant.h"
