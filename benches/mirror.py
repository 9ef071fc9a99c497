#!/usr/bin/env python3
"""Helper of benches/mirror.sh (python3 standard library only).

    mirror.py port                     a free TCP port on 127.0.0.1
    mirror.py images OUT [--quick]     write the synthetic images as OCI layouts under OUT and
                                       print what the bench needs to know about them (shell vars)
    mirror.py wrk FILE                 "REQ_PER_S P99_MS NON2XX" from a `wrk --latency` output
    mirror.py report SAMPLES OUT       medians, ratios and targets: a table on stdout, JSON to OUT
                                       (the machine and the settings come in BENCH_* variables)

Images are a pure function of their seeds (bytes from SHAKE-128 of a seed and a chunk index),
so every run and every machine pushes the same digests. Layers are ustar archives, either plain
or wrapped in gzip made of stored deflate blocks (valid gzip, no compressor involved), like the
interop tier's tests/interop/oci.rs.
"""

import hashlib
import json
import os
import re
import socket
import statistics
import sys
import zlib

MIB = 1 << 20
CHUNK = 4 * MIB

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


# ---------------------------------------------------------------------------------------------
# Deterministic content


def random_chunks(seed, size):
    """`size` pseudo-random (incompressible) bytes, in chunks, fully determined by `seed`."""
    for i, start in enumerate(range(0, size, CHUNK)):
        yield hashlib.shake_128(b"berth-bench/%d/%d" % (seed, i)).digest(min(CHUNK, size - start))


class BlobFile:
    """Writes one blob into a layout's blobs/sha256/, named by its digest once closed."""

    def __init__(self, layout):
        self.dir = os.path.join(layout, "blobs", "sha256")
        os.makedirs(self.dir, exist_ok=True)
        self.tmp = os.path.join(self.dir, ".partial")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self):
        self.f.close()
        hexd = self.sha.hexdigest()
        path = os.path.join(self.dir, hexd)
        os.replace(self.tmp, path)
        return "sha256:" + hexd, self.size, path


def put_blob(layout, data):
    b = BlobFile(layout)
    b.write(data)
    return b.close()


class StoredGzip:
    """gzip (RFC 1952) with stored deflate blocks, streamed into `out`."""

    def __init__(self, out):
        self.out = out
        self.pending = b""
        self.crc = 0
        self.size = 0
        out.write(bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255]))

    def _block(self, data, final):
        n = len(data)
        self.out.write(bytes([1 if final else 0]) + n.to_bytes(2, "little")
                       + (n ^ 0xFFFF).to_bytes(2, "little") + data)

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.pending += data
        cut = (len(self.pending) - 1) // 0xFFFF * 0xFFFF  # keep >= 1 byte for the final block
        for i in range(0, cut, 0xFFFF):
            self._block(self.pending[i:i + 0xFFFF], False)
        self.pending = self.pending[cut:]

    def close(self):
        self._block(self.pending, True)
        self.out.write(self.crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little"))


class Tee:
    """Hashes what passes through (the layer's diff id) and hands it on."""

    def __init__(self, out):
        self.out = out
        self.sha = hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        self.out.write(data)


def tar_header(name, size):
    h = bytearray(512)
    h[0:len(name)] = name.encode()

    def octal(lo, hi, value):
        digits = hi - lo - 1
        h[lo:hi] = ("%0*o" % (digits, value)).encode() + b"\0"

    octal(100, 108, 0o644)
    octal(108, 116, 0)
    octal(116, 124, 0)
    octal(124, 136, size)
    octal(136, 148, 0)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[265:269] = b"root"
    h[297:301] = b"root"
    h[148:155] = ("%06o" % sum(h)).encode() + b"\0"
    return bytes(h)


def write_tar(out, seed, file_sizes):
    """A ustar archive of pseudo-random regular files."""
    for i, size in enumerate(file_sizes):
        out.write(tar_header("layer-%x/file-%d.bin" % (seed, i), size))
        for chunk in random_chunks(seed * 1000 + i, size):
            out.write(chunk)
        if size % 512:
            out.write(b"\0" * (512 - size % 512))
    out.write(b"\0" * 1024)


def layer(layout, seed, file_sizes, gzip, media_type):
    """Writes a layer blob; returns (descriptor, diff_id, path)."""
    blob = BlobFile(layout)
    if gzip:
        gz = StoredGzip(blob)
        tee = Tee(gz)
        write_tar(tee, seed, file_sizes)
        gz.close()
    else:
        tee = Tee(blob)
        write_tar(tee, seed, file_sizes)
    digest, size, path = blob.close()
    return {"mediaType": media_type, "digest": digest, "size": size}, "sha256:" + tee.sha.hexdigest(), path


def descriptor(media_type, blob):
    digest, size, _ = blob
    return {"mediaType": media_type, "digest": digest, "size": size}


def image(layout, arch, layers, docker):
    """Config + manifest for `layers` [(descriptor, diff_id)]; returns the manifest descriptor."""
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "berth bench"}],
    }
    config_type, manifest_type = (DOCKER_CONFIG, DOCKER_MANIFEST) if docker else (OCI_CONFIG, OCI_MANIFEST)
    cfg = put_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": descriptor(config_type, cfg),
        "layers": [d for d, _ in layers],
    }
    return descriptor(manifest_type, put_blob(layout, json.dumps(manifest, indent=3).encode()))


def finish_layout(layout, top, tag):
    top = dict(top, annotations={"org.opencontainers.image.ref.name": tag})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def split4(total):
    """Four file sizes, multiples of 512 (no tar padding), adding up to about `total`."""
    part = max(512, total // 4 // 512 * 512)
    return [part] * 4


def images(out, quick):
    """The three synthetic images; prints shell assignments describing them."""
    # 1. five gzip layers, ~100 MiB in all, under a Docker schema2 manifest, so that the Docker
    #    Accept header of the manifest benchmark matches what is stored.
    layer_size = (2 if quick else 20) * MIB
    five = os.path.join(out, "five")
    layers = []
    for i in range(5):
        d, diff, _ = layer(five, 0x5000 + i, split4(layer_size), True, DOCKER_LAYER_GZIP)
        layers.append((d, diff))
    five_manifest = image(five, "amd64", layers, docker=True)
    # containers/image reads only OCI manifests from an OCI layout, so this one is pushed from
    # skopeo's `dir:` layout (manifest.json + blobs named by hex), hard-linked from the blobs.
    blobs = os.path.join(five, "blobs", "sha256")
    for name in os.listdir(blobs):
        target = "manifest.json" if name == five_manifest["digest"][7:] else name
        os.link(os.path.join(blobs, name), os.path.join(five, target))
    with open(os.path.join(five, "version"), "w") as f:
        f.write("Directory Transport Version: 1.1\n")

    # 2. one incompressible plain-tar layer of exactly BIG bytes: a single file filling it.
    big_size = (32 if quick else 512) * MIB
    big = os.path.join(out, "big")
    big_layer, diff, big_path = layer(big, 0xB16, [big_size - 1536], False, OCI_LAYER_TAR)
    assert big_layer["size"] == big_size, big_layer
    big_manifest = image(big, "amd64", [(big_layer, diff)], docker=False)
    finish_layout(big, big_manifest, "v1")

    # 3. an OCI index of amd64 and arm64 images sharing their base layer.
    per = (1 if quick else 8) * MIB
    multi = os.path.join(out, "multi")
    base = layer(multi, 0x3000, split4(per), True, OCI_LAYER_GZIP)[:2]
    entries = []
    for n, arch in enumerate(["amd64", "arm64"]):
        own = layer(multi, 0x3001 + n, split4(per // 2), True, OCI_LAYER_GZIP)[:2]
        m = image(multi, arch, [base, own], docker=False)
        entries.append(dict(m, platform={"architecture": arch, "os": "linux"}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    index_desc = descriptor(OCI_INDEX, put_blob(multi, json.dumps(index, indent=3).encode()))
    finish_layout(multi, index_desc, "v1")

    five_bytes = sum(d["size"] for d, _ in layers)
    print("FIVE_MANIFEST_DIGEST=%s" % five_manifest["digest"])
    print("FIVE_BYTES=%d" % five_bytes)
    print("BIG_DIGEST=%s" % big_layer["digest"])
    print("BIG_BYTES=%d" % big_size)
    print("BIG_PATH=%s" % big_path)
    print("MULTI_DIGEST=%s" % index_desc["digest"])


# ---------------------------------------------------------------------------------------------
# wrk output


def wrk(path):
    text = open(path).read()
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    if not rps or not p99:
        sys.exit("cannot parse wrk output %s:\n%s" % (path, text))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    bad = int(non2xx.group(1)) if non2xx else 0
    if errors:
        bad += sum(int(n) for n in re.findall(r"\d+", errors.group(0)))
    print("%s %.3f %d" % (rps.group(1), float(p99.group(1)) * scale, bad))


# ---------------------------------------------------------------------------------------------
# Report

# (metric, label, unit, better, target) — better: "low"/"high"; target: (kind, value, text)
#   kind "ratio": berth/reference must be <= value (low) or >= value (high)
#   kind "nginx": berth/nginx >= value;  kind "exact": berth == value
METRICS = [
    ("pull_cold_s", "1. skopeo pull 5-layer, cold", "s", "low", None),
    ("pull_warm_s", "1. skopeo pull 5-layer, warm", "s", "low", None),
    ("index_cold_s", "1. skopeo pull --all index, cold", "s", "low", None),
    ("index_warm_s", "1. skopeo pull --all index, warm", "s", "low", None),
    ("cold8_wall_s", "2. 8 concurrent cold GETs big blob, wall", "s", "low", ("ratio", 0.5, "<= 0.5x ref")),
    ("cold8_upstream_gets", "2. upstream GETs of that blob", "n", "low", ("exact", 1, "== 1")),
    ("ttfb_cold_s", "3. TTFB of a cold big blob", "s", "low", ("ratio", 1.0, "<= ref")),
    ("hit1_mbps", "4. cache-hit blob, 1 client", "MB/s", "high", ("ratio", 1.5, ">= 1.5x ref")),
    ("hit8_mbps", "4. cache-hit blob, 8 clients", "MB/s", "high", ("ratio", 1.5, ">= 1.5x ref")),
    ("hit1_vs_nginx", "4. cache-hit 1 client / nginx", "x", "high", ("nginx", 0.8, ">= 0.8 nginx")),
    ("hit8_vs_nginx", "4. cache-hit 8 clients / nginx", "x", "high", ("nginx", 0.8, ">= 0.8 nginx")),
    ("tag_rps", "5. warm manifest GET by tag", "req/s", "high", ("ratio", 3.0, ">= 3x ref")),
    ("tag_p99_ms", "5. warm manifest GET by tag, p99", "ms", "low", ("ratio", 1 / 3, "<= 1/3 ref")),
    ("digest_rps", "5. warm manifest GET by digest", "req/s", "high", None),
    ("digest_p99_ms", "5. warm manifest GET by digest, p99", "ms", "low", None),
    ("rss_cold8_mib", "6. peak RSS during 2", "MiB", "low", ("ratio", 0.5, "<= 0.5x ref")),
    ("rss_hit_mib", "6. peak RSS during 4", "MiB", "low", ("ratio", 0.5, "<= 0.5x ref")),
    ("cold8_cpu_s", "6. CPU time (user+sys) during 2", "s", "low", None),
    ("hit_cpu_s", "6. CPU time (user+sys) during 4", "s", "low", None),
    # Compared with berth plain in the same process (berth/ref column: TLS/plain).
    ("tls_same_hit1_mbps", "7. TLS cache-hit, 1 client", "MB/s", "high", ("ratio", 0.7, ">= 0.7x plain")),
    ("tls_same_hit8_mbps", "7. TLS cache-hit, 8 clients", "MB/s", "high", ("ratio", 0.7, ">= 0.7x plain")),
    ("tls_same_tag_rps", "7. TLS manifest GET by tag", "req/s", "high", None),
    ("tls_same_tag_p99_ms", "7. TLS manifest GET by tag, p99", "ms", "low", None),
]


def fmt(v):
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e6:
        return "%d" % v
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    if abs(v) >= 1:
        return "%.2f" % v
    return "%.3f" % v


def environment():
    """The BENCH_* variables mirror.sh sets, as the JSON file's header."""
    raw = {k[6:].lower(): v for k, v in os.environ.items() if k.startswith("BENCH_")}
    for k in ("nproc", "mem_mib", "runs", "five_bytes", "big_bytes", "clients"):
        raw[k] = int(raw[k])
    raw["quick"] = raw["quick"] == "1"
    first = ["date", "nproc", "cpu", "mem_mib", "kernel", "load_start", "load_end", "runs", "quick"]
    return {k: raw[k] for k in first + sorted(set(raw) - set(first))}


def report(samples_path, out_path):
    samples = {}  # (who, metric) -> [values]
    notes = []
    for line in open(samples_path):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "note":
            notes.append(line[5:].strip())
            continue
        who, metric, value = parts[0], parts[1], parts[2]
        samples.setdefault((who, metric), []).append(float(value))
    env = environment()

    def med(who, metric):
        v = samples.get((who, metric))
        return statistics.median(v) if v else None

    # Fractions of nginx, from the medians.
    for n in ("1", "8"):
        b, x = med("berth", "hit%s_mbps" % n), med("nginx", "hit%s_mbps" % n)
        r = med("reference", "hit%s_mbps" % n)
        if b and x:
            samples[("berth", "hit%s_vs_nginx" % n)] = [b / x]
        if r and x:
            samples[("reference", "hit%s_vs_nginx" % n)] = [r / x]

    rows, results = [], []
    for metric, label, unit, better, target in METRICS:
        b, r = med("berth", metric), med("reference", metric)
        if metric.endswith("_vs_nginx"):
            ratio = None
        else:
            ratio = b / r if (b is not None and r not in (None, 0)) else None
        extra = None
        if metric in ("hit1_mbps", "hit8_mbps"):
            extra = med("nginx", metric)
        if metric.startswith("tls_"):
            extra = med("berth", metric[4:])  # berth plain, for comparison
            r = None
            ratio = b / extra if (b is not None and extra) else None
        met = None
        if target and b is not None:
            kind, value, _ = target
            if kind == "exact":
                met = b == value
            elif kind == "nginx":
                met = b >= value
            elif ratio is not None:
                met = ratio <= value + 1e-9 if better == "low" else ratio >= value - 1e-9
        verdict = "-" if target is None else ("n/a" if met is None else ("met" if met else "MISSED"))
        results.append({
            "metric": metric, "label": label, "unit": unit, "better": better,
            "berth": b, "reference": r, "ratio": ratio,
            "nginx" if not metric.startswith("tls_") else "berth_plain": extra,
            "runs": {w: samples.get((w, metric), []) for w in ("berth", "reference", "nginx")
                     if samples.get((w, metric))},
            "target": target[2] if target else None, "met": met,
        })
        if metric.startswith("tls_") and b is None:
            continue
        rows.append([label, unit, fmt(b), fmt(r), fmt(ratio),
                     fmt(extra) if metric.startswith(("hit1_mbps", "hit8_mbps", "tls_")) else "",
                     target[2] if target else "", verdict])

    if not any(r["metric"].startswith("tls_") and r["berth"] is not None for r in results):
        notes.append("7. TLS vs plain: n/a: TLS not built (berth has no --tls-listen on this branch)")

    head = ["metric (median of %d runs)" % env["runs"], "unit", "berth", "reference", "berth/ref",
            "nginx or plain", "target", "verdict"]
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    lines = []
    lines.append("berth mirror benchmark — %s" % env["date"])
    busy = float(env["load_start"].split()[0]) >= 0.5
    lines.append("machine: %s CPUs (%s), %s MiB RAM, kernel %s" % (
        env["nproc"], env.get("cpu", "?"), env["mem_mib"], env["kernel"]))
    lines.append("load average (1/5/15 min) at start %s, at end %s%s" % (
        env["load_start"], env["load_end"],
        " — the machine was busy with other work: timings are noisy" if busy else ""))
    lines.append("sizes: 5-layer image %.1f MiB, big blob %d MiB; runs %d%s; berth at %s; reference: %s"
                 % (env["five_bytes"] / MIB, env["big_bytes"] // MIB, env["runs"],
                    " (--quick)" if env["quick"] else "", env["berth_rev"], env["reference"]))
    lines.append("")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    if notes:
        lines.append("")
        for n in notes:
            lines.append("- " + n)
    text = "\n".join(lines)
    print(text)
    env["results"] = results
    env["notes"] = notes
    env["table"] = text
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(env, f, indent=2)
        f.write("\n")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "port":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
        s.close()
    elif cmd == "images":
        images(sys.argv[2], "--quick" in sys.argv[3:])
    elif cmd == "wrk":
        wrk(sys.argv[2])
    elif cmd == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
