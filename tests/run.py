"""Run the whole suite with trial and end with a line ``N passed, N failed``."""

import re
import shutil
import subprocess
import sys
import tempfile

SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)$")


def main() -> int:
    args = sys.argv[1:] or ["tests"]
    # short (UNIX socket paths live there) and this run's own: two runs may share a machine
    temp = tempfile.mkdtemp(prefix="malai-trial-", dir="/tmp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted.trial", f"--temp-directory={temp}/t", *args],
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
    if code == 0:
        shutil.rmtree(temp, ignore_errors=True)
    else:
        print(f"trial's log and temporary files: {temp}/t")
    print(f"{passed} passed, {failed} failed{tail}")
    return code


if __name__ == "__main__":
    sys.exit(main())
