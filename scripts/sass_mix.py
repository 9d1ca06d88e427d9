"""Instruction mix of the wgmma main loops in an sm_90a cubin, without a GPU.

There is no SASS disassembler on the development machine, but a cubin is an
ELF file whose `.text.<kernel>` sections hold the SASS, 16 bytes an
instruction, the opcode in the low 12 bits of the first 8 bytes. This maps
those opcodes to mnemonics with a table taken from `cuobjdump -sass` output
of our own cubins (`scripts/sass_opcodes.json`; rebuild it on the device
with the `map` command), which is enough to count what a kernel's main loop
issues: the stretch from a stage's barrier wait to its last HGMMA.

    python3 scripts/sass_mix.py show CUBIN [SUBSTR ...]   # kernels whose name has every SUBSTR
    python3 scripts/sass_mix.py compare OLD.cubin NEW.cubin [SUBSTR ...]
    python3 scripts/sass_mix.py map SASS_TEXT ... > scripts/sass_opcodes.json

Build the cubin with the package's flags, e.g.
    nvcc -std=c++17 -O3 -Icsrc -gencode=arch=compute_90a,code=sm_90a \\
      -DJAX_MARLIN_SM90A_BUILD -cubin -o d.cubin csrc/cuda/marlin_dispatch.cu
"""

import collections
import json
import os
import re
import struct
import sys

OPCODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass_opcodes.json")
# HGMMAs more than this many instructions apart belong to different loops.
RUN_GAP = 200
# How far before a loop's first HGMMA its stage's barrier wait may sit.
STAGE_LEAD = 150


def build_map(paths):
    """Opcode -> mnemonic from cuobjdump -sass text (every opcode one mnemonic)."""
    line = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);\s*/\* (0x[0-9a-f]+) \*/")
    seen = collections.defaultdict(collections.Counter)
    for path in paths:
        with open(path) as f:
            for text in f:
                m = line.search(text)
                if m:
                    ins = re.sub(r"^@!?U?P[T0-9]\s+", "", m.group(1).strip())
                    seen[int(m.group(2), 16) & 0xFFF][ins.split()[0].split(".")[0]] += 1
    clash = {k: dict(v) for k, v in seen.items() if len(v) > 1}
    if clash:
        raise SystemExit(f"opcodes with several mnemonics: {clash}")
    return {f"{k:03x}": v.most_common(1)[0][0] for k, v in sorted(seen.items())}


def kernels(path, subs):
    """{kernel name: [mnemonic, ...]} for the cubin's kernels whose name has every SUBSTR."""
    with open(OPCODES) as f:
        names = {int(k, 16): v for k, v in json.load(f).items()}
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF":
        raise SystemExit(f"{path}: not an ELF cubin")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for h in headers:
        end = data.index(b"\0", strtab + h[0])
        name = data[strtab + h[0] : end].decode()
        if name.startswith(".text.") and all(s in name for s in subs):
            words = struct.unpack_from(f"<{h[5] // 8}Q", data, h[4])[::2]
            out[name[len(".text.") :]] = [names.get(w & 0xFFF, f"?{w & 0xFFF:03x}") for w in words]
    return out


def loops(ops):
    """(HGMMAs, instructions, mix) of each run of HGMMAs, from its stage's barrier wait."""
    at = [i for i, op in enumerate(ops) if op == "HGMMA"]
    runs = []
    for i in at:
        if runs and i - runs[-1][-1] <= RUN_GAP:
            runs[-1].append(i)
        else:
            runs.append([i])
    out = []
    for run in runs:
        start = run[0]
        while start > 0 and run[0] - start < STAGE_LEAD and not ops[start].startswith("SYNCS"):
            start -= 1
        span = ops[start : run[-1] + 1]
        out.append((len(run), len(span), collections.Counter(span)))
    return out


def short(name):
    """A kernel's tile in a few words: TileShape's (and SparseTileShape's) first five parameters."""
    m = re.search(r"I(6__half|13__nv_bfloat16)N.*?(Sparse)?TileShapeILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELb(\d)",
                  name)
    if not m:
        return name[:60]
    dtype = "fp16" if "half" in m.group(1) else "bf16"
    kind, k = ("2:4 ", "bands") if m.group(2) else ("", "kb")
    scales = "g" if m.group(7) == "1" else "ch"
    return f"{kind}{dtype} rb{m.group(3)} nb{m.group(4)} {k}{m.group(5)} w{m.group(6)} {scales}"


def loop_sizes(runs):
    return " ".join(f"{n}/{size}" for n, size, _ in runs)


def main(argv):
    if len(argv) < 2 or argv[0] not in ("show", "compare", "map"):
        raise SystemExit(__doc__)
    if argv[0] == "map":
        json.dump(build_map(argv[1:]), sys.stdout, indent=0, sort_keys=True)
        print()
    elif argv[0] == "show":
        for name, ops in sorted(kernels(argv[1], argv[2:]).items()):
            print(f"{short(name)}: {len(ops)} instructions")
            for n, size, mix in loops(ops):
                top = ", ".join(f"{k} {v}" for k, v in mix.most_common(14))
                print(f"  {n} HGMMA in {size} ({size / n:.1f} each): {top}")
    else:
        old, new = kernels(argv[1], argv[3:]), kernels(argv[2], argv[3:])
        for name in sorted(set(old) & set(new)):
            a, b = loops(old[name]), loops(new[name])
            if a or b:
                print(f"{short(name):32s} {len(old[name]):5d} -> {len(new[name]):5d}   "
                      f"loops (HGMMA/instructions) {loop_sizes(a)} -> {loop_sizes(b)}")


if __name__ == "__main__":
    main(sys.argv[1:])
