// The host driver's elementwise launches: every ElementwiseKernel,
// BiasGradKernel and BiasReduceKernel, and the MaskKernel (host_runner.h).
#include "host_runner.h"

namespace dropout_ext {
namespace cuda {

template bool run_forward<HostRunner>(HostRunner&, const DropoutArgs&, int);
template bool run_backward<HostRunner>(HostRunner&, const DropoutArgs&, int);
template bool run_mask<HostRunner>(HostRunner&, const MaskArgs&, int);

}  // namespace cuda
}  // namespace dropout_ext
