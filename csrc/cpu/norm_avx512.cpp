// The dropout_add_norm kernels built for AVX-512.
#include "isa.h"
#ifdef DX_HAVE_X86_BUILDS
#define DX_ISA kAvx512
#define DX_ISA_TARGET DX_TARGET_AVX512
#include "norm_isa.inc"
#endif
