"""The built extension uses the process's C++ standard library instead of carrying its own.

A compiler set up to link libstdc++ statically puts a private copy of the stream code into
l2p._C. That copy's locale is never initialised in a Python process, so the first error
message that formats a number (every TORCH_CHECK with a size in it) crashes with SIGSEGV
instead of raising. This was seen with a GPU image whose CXX pointed at such a toolchain; this
test names the cause where the op error tests would only see the crash."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from l2p.ops import _extension

NM = shutil.which("nm")
# std::ostream::_M_insert<long>(long): what `stream << int64` calls inside libstdc++.
STREAM_INSERT_LONG = "_ZNSo9_M_insertIlEERSoT_"


@pytest.mark.skipif(NM is None, reason="nm (binutils) is not on the PATH")
@pytest.mark.skipif(not _extension.is_compiled(), reason="l2p._C is not built")
def test_extension_does_not_carry_a_copy_of_libstdcxx():
    from l2p import _C

    symbols = subprocess.run([NM, "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=False).stdout
    symbols += subprocess.run([NM, "-D", "--defined-only", _C.__file__], capture_output=True,
                              text=True, check=False).stdout
    assert STREAM_INSERT_LONG not in symbols, (
        f"{_C.__file__} defines libstdc++'s stream code itself: the C++ compiler it was built with "
        "links libstdc++ statically, and its error messages will crash. Rebuild with a compiler "
        "that links libstdc++ dynamically, e.g. `CXX=/usr/bin/g++ pip install .`")
