"""Direct ``torch.ops.l2p`` calls with bad arguments, each run in a child process.

These calls skip the Python fronts, so the C++ checks must raise. Running them in a child keeps
a toolchain that cannot carry C++ exceptions out of an extension (seen once on a CUDA image:
a SIGSEGV on the first failed TORCH_CHECK, also with a five-line load_inline extension) from
taking the whole test session down: the test fails and says so, the other tests still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_RUNNER = textwrap.dedent(
    """
    import json, sys, torch
    import l2p.ops  # registers torch.ops.l2p
    device = sys.argv[1]
    results = []
    for code in json.loads(sys.stdin.read()):
        try:
            exec(code, {"torch": torch, "device": device})
            results.append({"code": code, "error": None, "message": ""})
        except Exception as err:
            results.append({"code": code, "error": type(err).__name__, "message": str(err)})
        print(json.dumps(results[-1]), flush=True)
    """
)


def direct_call_errors(device: str, calls: list[str]) -> list[dict]:
    """Run each snippet of ``calls`` (with ``torch`` and ``device`` in scope) in one child
    process; one {"code", "error", "message"} per snippet, in order."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER, device], input=json.dumps(calls),
                          capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(results) != len(calls):
        done = len(results)
        raise AssertionError(
            f"the child process exited with {proc.returncode} after {done} of {len(calls)} calls; "
            f"it died on: {calls[done] if done < len(calls) else '(after the last call)'}\n"
            f"stderr: {proc.stderr[-2000:]}")
    return results


def assert_raises_each(device: str, cases: list[tuple[str, type, str]]) -> None:
    """Each (code, exception type, substring of the message) must raise as stated."""
    import re

    results = direct_call_errors(device, [code for code, _, _ in cases])
    for (code, error, match), got in zip(cases, results):
        assert got["error"] == error.__name__, f"{code}: expected {error.__name__}, got {got}"
        assert re.search(match, got["message"]), f"{code}: message {got['message']!r} lacks {match!r}"
