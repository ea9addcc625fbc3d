// The dropout_add_norm kernels built for the baseline x86-64 (or whatever the
// compiler targets off x86).
#define DX_ISA kBaseline
#define DX_ISA_TARGET
#include "norm_isa.inc"
