"""Compare two bundle manifests: everything but timestamps, timings and tool versions must match;
file hashes are listed where they differ."""
import json, sys

VOLATILE = {"created", "export_seconds", "tools", "seconds"}

def strip(x, path=""):
    if isinstance(x, dict):
        return {k: strip(v, f"{path}.{k}") for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [strip(v, path) for v in x]
    return x

def diff(a, b, path=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k in b else 'before'}")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: {a!r} -> {b!r}")
    return out

a, b = (json.load(open(p)) for p in sys.argv[1:3])
d = diff(strip(a), strip(b))
hashes = [x for x in d if x.split(":")[0].endswith((".sha256", ".bytes"))]
other = [x for x in d if x not in hashes]
print(f"{len(other)} differences outside file hashes/sizes")
for x in other:
    print("  ", x)
print(f"{len(hashes)} file hash/size differences")
for x in hashes:
    print("  ", x)
