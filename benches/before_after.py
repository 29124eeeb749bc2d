#!/usr/bin/env python3
"""`plan` and a no-op `apply` on the default HGX fixture, this tree's
release build against another commit's, runs interleaved so that both see
the same machine. Prints each median and their ratio.

    python3 benches/before_after.py BASE_COMMIT [RUNS]

The base is built in a temporary git worktree (its own target directory)
and each build runs on its own commit's fixture host, as a user would meet
it; the no-op apply runs on a copy that build converged first.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "fixtures/hosts/h100x8-nvswitch-preinstalled"


def build(tree):
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "gpuprov"], cwd=tree, check=True)
    return os.path.join(tree, "target/release/gpuprov")


def main():
    base, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scratch = tempfile.mkdtemp(prefix="gpuprov-before-after-")
    worktree = os.path.join(scratch, "base")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", worktree, base], cwd=here, check=True)
    try:
        trees = {"base": worktree, "head": here}
        builds = {name: (build(tree), os.path.join(tree, HOST)) for name, tree in trees.items()}
        converged = {}
        for name, (binary, host) in builds.items():
            copy = os.path.join(scratch, f"{name}-host")
            shutil.copytree(host, copy, symlinks=True)
            for _ in range(2):
                subprocess.run([binary, "apply", "--host-exec", "prefix", "--host-root", copy], capture_output=True)
            converged[name] = copy
        times = {(name, kind): [] for name in builds for kind in ("plan", "apply")}
        for i in range(runs):
            order = list(builds.items()) if i % 2 == 0 else list(reversed(builds.items()))
            for name, (binary, host) in order:
                for kind, root in (("plan", host), ("apply", converged[name])):
                    start = time.perf_counter()
                    done = subprocess.run([binary, kind, "--host-exec", "prefix", "--host-root", root], capture_output=True)
                    times[(name, kind)].append((time.perf_counter() - start) * 1000)
                    if done.returncode != 0:
                        sys.exit(f"{name} {kind} exited {done.returncode}: {done.stderr.decode()[-500:]}")
        for kind in ("plan", "apply"):
            before = statistics.median(times[("base", kind)])
            after = statistics.median(times[("head", kind)])
            print(f"{kind:5} on {HOST}: {base} {before:.1f} ms, this tree {after:.1f} ms, "
                  f"ratio {after / before:.2f} (median of {runs}, interleaved)")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=here)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
