"""kiln.passes: the pass manager, the rewrite-rule language and the passes.

Importing this package registers the default pipeline in DESIGN.md order."""
from . import canonicalize  # noqa: F401  (registers)
from .manager import PIPELINE, Pass, PassContext, PassManager, pass_names, register_pass

__all__ = ["PIPELINE", "Pass", "PassContext", "PassManager", "pass_names", "register_pass"]
