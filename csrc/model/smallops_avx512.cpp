// The small ops built for AVX-512 F/BW/VL/DQ (contraction off): see smallops.inc.
#define SMALLOPS_NS avx512
#define SMALLOPS_TABLE kSmallOpsAvx512
#define SMALLOPS_LANES 16
#include "model/smallops.inc"
