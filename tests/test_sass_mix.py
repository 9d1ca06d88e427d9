"""scripts/sass_mix.py, the SASS instruction counter for cubins: it reads
`.text.<kernel>` sections of an ELF file and names each 16-byte
instruction by its opcode, then measures the runs of HGMMAs."""

from __future__ import annotations

import json
import struct

import pytest


def opcode(sass, mnemonic):
    with open(sass.OPCODES) as f:
        return next(int(k, 16) for k, v in json.load(f).items() if v == mnemonic)


def elf(sections):
    """A minimal little-endian ELF64 file with the given (name, bytes) sections."""
    names = b"\0.shstrtab\0" + b"".join(n.encode() + b"\0" for n, _ in sections)
    body = bytearray(b"\0" * 0x40)
    placed = []
    for _, data in sections:
        placed.append((len(body), len(data)))
        body += data
    strtab_at = len(body)
    body += names
    shoff = len(body)
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
               struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, strtab_at, len(names), 0, 0, 1, 0)]
    name_at = len(b"\0.shstrtab\0")
    for (n, _), (at, size) in zip(sections, placed):
        headers.append(struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, at, size, 0, 0, 16, 0))
        name_at += len(n) + 1
    body += b"".join(headers)
    body[:4] = b"\x7fELF"
    struct.pack_into("<Q", body, 0x28, shoff)
    struct.pack_into("<HHH", body, 0x3A, 64, len(headers), 1)
    return bytes(body)


def code(ops):
    # The opcode in the low 12 bits of each instruction's first 8 bytes;
    # other bits set, as operands would be.
    return b"".join(struct.pack("<QQ", 0xABC000 | op, 0x1234) for op in ops)


def test_counts_a_loop_from_its_barrier_wait(tmp_path, util):
    sass = util.load_script("sass_mix")
    hg, lds, syncs, lop = (opcode(sass, m) for m in ("HGMMA", "LDS", "SYNCS", "LOP3"))
    loop = [syncs] + [lds, lop, lop, hg] * 4
    far = [lop] * (sass.RUN_GAP + 1)
    path = tmp_path / "k.cubin"
    path.write_bytes(elf([(".text.kernel_a", code([lop] * 3 + loop + far + [syncs, hg])),
                          (".text.other", code([hg]))]))
    found = sass.kernels(str(path), ["kernel_a"])
    assert list(found) == ["kernel_a"]
    ops = found["kernel_a"]
    assert len(ops) == 3 + len(loop) + len(far) + 2
    runs = sass.loops(ops)
    # Two runs: the loop (its 4 HGMMAs, counted from the SYNCS) and the lone
    # HGMMA past the gap.
    assert [(n, size) for n, size, _ in runs] == [(4, len(loop)), (1, 2)]
    assert runs[0][2]["LOP3"] == 8 and runs[0][2]["LDS"] == 4


def test_unknown_opcodes_are_marked_and_bad_files_refused(tmp_path, util):
    sass = util.load_script("sass_mix")
    with open(sass.OPCODES) as f:
        known = {int(k, 16) for k in json.load(f)}
    unknown = next(op for op in range(0xFFF) if op not in known)
    path = tmp_path / "k.cubin"
    path.write_bytes(elf([(".text.k", code([unknown]))]))
    assert sass.kernels(str(path), []) == {"k": [f"?{unknown:03x}"]}
    bad = tmp_path / "not.cubin"
    bad.write_bytes(b"PTX")
    with pytest.raises(SystemExit, match="not an ELF"):
        sass.kernels(str(bad), [])


def test_builds_the_map_from_disassembly(tmp_path, util):
    sass = util.load_script("sass_mix")
    text = tmp_path / "k.sass"
    text.write_text("        /*0010*/                   HGMMA.64x64x16.F32 R24, R88, gdesc[UR4], R24 ;"
                    "   /* 0x01e0000458187df0 */\n"
                    "        /*0020*/               @!P0 LDS R21, [R16+0x800] ;   /* 0x000800ff10157984 */\n")
    assert sass.build_map([str(text)]) == {"df0": "HGMMA", "984": "LDS"}
    text.write_text(text.read_text() + "        /*0030*/   LOP3.LUT R1, R2, R3 ;   /* 0x0000000000000df0 */\n")
    with pytest.raises(SystemExit, match="several mnemonics"):
        sass.build_map([str(text)])
