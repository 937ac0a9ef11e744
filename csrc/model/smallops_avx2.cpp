// The small ops built for AVX2 (+FMA flags, contraction off): see smallops.inc.
#define SMALLOPS_NS avx2
#define SMALLOPS_TABLE kSmallOpsAvx2
#define SMALLOPS_LANES 8
#include "model/smallops.inc"
