"""The pickle scanner models the memo exactly as ``pickle`` does: hand-built opcode streams.

Every stream is also run through a real ``pickle.Unpickler`` whose
``find_class`` only records what it is asked for, so each test states the
truth it is checked against: the scanner refuses a stream if and only if
``pickle`` would fail on it or would import a global outside the allow-list.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from engine_kit.checkpoint import CheckpointRecord, load_checkpoint_file, seal_archive_file, verify_checkpoint_file
from engine_kit.checkpoint.safety import PickleMemo, is_allowed_global, scan_pickle
from engine_kit.errors import CheckpointCorruptError

MEMOIZE, STACK_GLOBAL, POP, EMPTY_TUPLE, REDUCE = b"\x94", b"\x93", b"0", b")", b"R"


def text(value: str) -> bytes:
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def binput(index: int) -> bytes:
    return b"q" + bytes([index])


def binget(index: int) -> bytes:
    return b"h" + bytes([index])


def long_binput(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def long_binget(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


def put(index: int) -> bytes:
    return b"p" + str(index).encode() + b"\n"


def get(index: int) -> bytes:
    return b"g" + str(index).encode() + b"\n"


def stream(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def globals_pickle_imports(data: bytes) -> list[tuple[str, str]] | None:
    """What a real unpickler would import (None: it fails on the stream)."""
    seen: list[tuple[str, str]] = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            seen.append((module, name))
            return lambda *args: None

    try:
        Recorder(io.BytesIO(data)).load()
    except Exception:
        return None
    return seen


STREAMS = {
    # Explicit puts make len(memo) differ from "number of MEMOIZE ops": MEMOIZE stores at
    # len(memo). A model that counted MEMOIZE ops would read GET 1 / GET 3 as torch.Size.
    "memoize-after-a-sparse-put": stream(
        text("x"), binput(5), text("builtins"), MEMOIZE, text("torch"), MEMOIZE, text("print"), MEMOIZE,
        text("Size"), MEMOIZE, binget(1), binget(3), STACK_GLOBAL,
    ),
    # MEMOIZE onto an index an explicit put already holds: it replaces, len(memo) stays.
    "memoize-onto-an-existing-index": stream(
        text("a"), binput(0), text("b"), binput(2), text("torch"), MEMOIZE, text("print"), MEMOIZE,
        text("builtins"), binput(3), binget(3), binget(2), STACK_GLOBAL,
    ),
    "redefined-by-a-string": stream(
        text("torch"), binput(0), text("Size"), binput(1), text("builtins"), binput(0), text("print"), binput(1),
        binget(0), binget(1), STACK_GLOBAL,
    ),
    "redefined-by-a-non-string": stream(text("torch"), binput(0), EMPTY_TUPLE, binput(0), binget(0), text("Size"), STACK_GLOBAL),
    "get-of-an-index-never-put": stream(text("torch"), binput(0), binget(7), text("Size"), STACK_GLOBAL),
    "long-variants": stream(
        text("builtins"), long_binput(70000), text("torch"), MEMOIZE, text("exec"), long_binput(70001),
        long_binget(70000), long_binget(70001), STACK_GLOBAL,
    ),
    "text-variants": stream(text("builtins"), put(3), POP, text("eval"), put(4), POP, get(3), get(4), STACK_GLOBAL),
    "negative-text-put": stream(text("torch"), b"p-1\n", POP, text("torch"), text("Size"), STACK_GLOBAL),
    "name-below-a-pop": stream(text("builtins"), text("torch"), POP, text("print"), STACK_GLOBAL),
    # Benign layouts that use the same machinery must still pass.
    "benign-memoized-global": stream(
        text("torch"), MEMOIZE, text("Size"), MEMOIZE, binget(0), binget(1), STACK_GLOBAL, EMPTY_TUPLE, REDUCE
    ),
    "benign-memoize-after-sparse-put": stream(
        text("x"), binput(9), text("collections"), MEMOIZE, text("OrderedDict"), MEMOIZE, binget(1), binget(2), STACK_GLOBAL
    ),
    "benign-redefinition": stream(
        text("builtins"), binput(0), text("torch"), binput(0), text("device"), binput(1), binget(0), binget(1), STACK_GLOBAL
    ),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_scanner_refuses_exactly_what_pickle_would_import_unsafely(name: str) -> None:
    data = STREAMS[name]
    imports = globals_pickle_imports(data)
    unsafe = imports is None or not all(is_allowed_global(module, attr) for module, attr in imports)
    assert unsafe == (not name.startswith("benign")), (name, imports)  # the stream does what its name says
    if unsafe:
        with pytest.raises(ValueError):
            scan_pickle(data)
    else:
        scan_pickle(data)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("memoize-after-a-sparse-put", "builtins.print"),
        ("memoize-onto-an-existing-index", "builtins.print"),
        ("redefined-by-a-string", "builtins.print"),
        ("long-variants", "builtins.exec"),
        ("text-variants", "builtins.eval"),
        ("get-of-an-index-never-put", "memo index 7, which was never stored"),
        ("negative-text-put", "negative"),
    ],
)
def test_refusals_name_the_real_global_or_the_memo_fault(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scan_pickle(STREAMS[name])


def test_memo_model_tracks_len_not_op_count() -> None:
    memo = PickleMemo()
    memo.put(5, "x")
    memo.put(memo.next_index(), "a")  # lands at 1: one index was stored
    memo.put(1, None)  # redefined by a non-string: the string is forgotten
    assert memo.next_index() == 2 and memo.get(1) is None and memo.get(5) == "x"
    with pytest.raises(ValueError, match="never stored"):
        memo.get(0)
    with pytest.raises(ValueError, match="beyond"):
        memo.put(1 << 40, "y")


def test_a_sealed_checkpoint_carrying_the_memo_trick_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trick.ekpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", STREAMS["memoize-after-a-sparse-put"])
        archive.writestr("archive/version", "3\n")
    seal_archive_file(path, CheckpointRecord("trick.ekpt", step=1, epoch=0, order=1))
    for check in (verify_checkpoint_file, load_checkpoint_file):
        with pytest.raises(CheckpointCorruptError, match=r"refused.*builtins\.print"):
            check(path)
