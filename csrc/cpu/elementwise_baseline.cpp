// The elementwise kernels built for the baseline x86-64 (or whatever the
// compiler targets off x86).
#define DX_ISA kBaseline
#define DX_ISA_TARGET
#include "elementwise_isa.inc"
