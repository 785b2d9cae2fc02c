import subprocess, sys, time, urllib.request, socket, statistics
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
def once(py, art):
    p = port(); t0 = time.time()
    proc = subprocess.Popen([py, "-m", "kiln.cli", "serve", art, "--port", str(p), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=1) as r:
                    if r.status == 200: return time.time() - t0
            except OSError: time.sleep(0.05)
    finally:
        proc.terminate(); proc.wait()
res = {"before": [], "after": []}
for i in range(4):
    res["before"].append(once("/tmp/ci/.venv/bin/python", "/tmp/art"))
    res["after"].append(once("/work/main/.venv/bin/python", "/tmp/art"))
for k, v in res.items(): print(k, ["%.2f" % x for x in v], "median %.2f" % statistics.median(v))
