// The matching kernels built for the AVX2 CPU capability: setup.py compiles this file with
// that capability's flags and -DCPU_CAPABILITY=AVX2. The code is in variant.h.
#include "cpu/variant.h"
