// The host driver's dropout_add_norm launches: NormForwardKernel,
// NormBackwardKernel and the parameter gradients' sums (host_runner.h).
#include "host_runner.h"

namespace dropout_ext {
namespace cuda {

template bool run_norm_forward<HostRunner>(HostRunner&, const NormArgs&, int);
template bool run_norm_backward<HostRunner>(HostRunner&, const NormArgs&, int);

}  // namespace cuda
}  // namespace dropout_ext
