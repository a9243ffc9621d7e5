"""Run the whole suite with trial and end with a line ``N passed, N failed``."""

import re
import subprocess
import sys

SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)$")


def main() -> int:
    args = sys.argv[1:] or ["tests"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted.trial", "--temp-directory=/tmp/malai_trial", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    counts = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = SUMMARY.match(line.strip())
        if m:
            counts = {k: int(v) for k, v in (p.split("=") for p in m.group(2).split(", "))}
    code = proc.wait()
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses"))
    skipped = counts.get("skips", 0)
    if not counts and code:
        failed = max(failed, 1)
    tail = f", {skipped} skipped" if skipped else ""
    print(f"{passed} passed, {failed} failed{tail}")
    return code


if __name__ == "__main__":
    sys.exit(main())
