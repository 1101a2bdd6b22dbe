"""Reference point, not loratools: the same raw safetensors copy with the standard library only.

What loratools' same-layout, same-dtype copy does (parse the header, temporary file beside the
destination, ``posix_fallocate``, header bytes, one ``copy_file_range`` per tensor in offset order,
fsync, rename) without importing torch or the safetensors library. Its distance from the loratools
rows is what the imports and the remaining Python overhead cost.

    python bench/stdlib_copy.py SRC DST [--no-fsync]
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import time


def copy(src: str, dst: str, *, fsync: bool = True) -> int:
    fd = os.open(src, os.O_RDONLY)
    try:
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        head = os.pread(fd, 8 + length, 0)
        table = json.loads(head[8:])
        table.pop("__metadata__", None)
        spans = sorted(tuple(entry["data_offsets"]) for entry in table.values())
        size = os.fstat(fd).st_size
        out, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".stdlib.", suffix=".partial")
        try:
            os.posix_fallocate(out, 0, size)
            os.write(out, head)
            for start, end in spans:
                done = 0
                while done < end - start:
                    got = os.copy_file_range(fd, out, end - start - done, 8 + length + start + done)
                    if got <= 0:
                        raise OSError(f"{src}: truncated")
                    done += got
            if fsync:
                os.fsync(out)
        except BaseException:
            os.close(out)
            os.unlink(tmp)
            raise
        os.close(out)
        os.replace(tmp, dst)
        return len(spans)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[2:] not in ([], ["--no-fsync"]):
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    n = copy(argv[0], argv[1], fsync=argv[2:] != ["--no-fsync"])
    impl = "stdlib json + copy_file_range" + (", no fsync" if argv[2:] else " + fsync")
    print(json.dumps({"impl": impl, "raw_copied": n, "inner_s": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
