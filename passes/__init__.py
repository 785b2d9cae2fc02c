"""kiln.passes: the pass manager, the rewrite-rule language and the passes.

Importing this package registers the default pipeline in DESIGN.md order."""
from . import canonicalize  # noqa: F401  (registers)
from . import forms  # noqa: F401,E402  (registers canonicalize.forms)
from . import reinplace  # noqa: F401,E402  (registers)
from . import shard  # noqa: F401,E402  (shard.tensor_parallel, with tensor_parallel_size > 1)
from . import parallel_linear  # noqa: F401,E402  (registers fuse.parallel_linear)
from . import quantize  # noqa: F401,E402  (registers quantize)
from . import fuse  # noqa: F401,E402  (fuse.norm, .rope, .attention, .activation, .moe, .quant)
from . import collective  # noqa: F401,E402  (shard.experts, fuse.collective)
from . import rope_pair  # noqa: F401,E402  (fuse.rope_pair, Triton targets)
from . import serve_kv_cache  # noqa: F401,E402  (serve.kv_cache, serving only)
from . import serve_hidden  # noqa: F401,E402  (serve.hidden_states, serving only)
from . import prologue  # noqa: F401,E402  (fuse.prologue, Triton targets)
from . import scalar_inputs  # noqa: F401,E402  (capture.scalar_inputs, with CUDA graphs)
from . import align  # noqa: F401,E402  (prepare.align, targets with a weight alignment)
from . import schedule  # noqa: F401,E402  (schedule: last)
from .manager import PIPELINE, Pass, PassContext, PassManager, pass_names, register_pass

__all__ = ["PIPELINE", "Pass", "PassContext", "PassManager", "pass_names", "register_pass"]
