import sys, time
from kiln.cli import main
rc = main(sys.argv[1:])
from kiln.backends.tvm import counts
c = counts()
print("TVM counts:", {k: v for k, v in sorted(c.items())}, file=sys.stderr)
