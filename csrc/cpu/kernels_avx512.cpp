// The matching kernels built for the AVX512 CPU capability: setup.py compiles this file with
// that capability's flags and -DCPU_CAPABILITY=AVX512. The code is in variant.h.
#include "cpu/variant.h"
