// The elementwise kernels built for AVX2.
#include "isa.h"
#ifdef DX_HAVE_X86_BUILDS
#define DX_ISA kAvx2
#define DX_ISA_TARGET DX_TARGET_AVX2
#include "elementwise_isa.inc"
#endif
