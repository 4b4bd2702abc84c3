#!/usr/bin/env python3
"""Cold-start benchmark, HelloBench style: pull, create and run of workload images,
each from a cold start (fresh containerd content store and snapshots, fresh lazysnap
root and cache), through a link that is either loopback or a simulated WAN.

Modes (columns):
  overlayfs   containerd's overlayfs snapshotter, full pull of the gzip image
  lazy        lazysnap, the eStargz image (converted by lazysnap, no prioritized files)
  optimized   lazysnap, the eStargz image with the workload's files first
              (`lazysnap convert --optimize` when it exists, else a recorded access list)
  adaptive    lazysnap with the adaptive unlazy policy ([unlazy] read_fraction)
  <peer>      another lazy snapshotter on the eStargz image: --peer stargz=/tmp/ref-bin/containerd-stargz-grpc

Workloads (images, built locally from Debian packages):
  busybox     busybox-static, `echo hello`
  python      debootstrap minbase + python3 (scripts/python-image.sh), python3 -c 'print("hello")'
  bigdata     busybox + a data layer of --bigdata-mb MiB in 4 MiB files; reads at least 80% of them

usage (root, from the repository):
  bench/coldstart.py [--runs 3] [--links local,wan] [--images busybox,python,bigdata]
                     [--modes overlayfs,lazy,optimized,adaptive] [--peer NAME=BIN]
                     [--bigdata-mb 512] [--out bench/results] [--benchmarks BENCHMARKS.md]
Writes OUT/coldstart.csv (every run), OUT/coldstart.svg (stacked p50 bars) and, with
--benchmarks, a "## Cold start (#9)" section.
"""
import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("LAZYSNAP_BENCH_CACHE", "/var/tmp/lazysnap-bench")
LAZYSNAP = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release/lazysnap")
CTR_REMOTE = shutil.which("ctr-remote") or "/tmp/ref-bin/ctr-remote"
NS = "bench"


def log(*a):
    print("coldstart:", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def sh(cmd, timeout=900, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return r


def wait_for(pred, limit=30.0, what="service"):
    end = time.time() + limit
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


def detach_under(path):
    mps = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            if mp.startswith(path + "/"):
                mps.append(mp)
    for mp in sorted(mps, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


# ---------------------------------------------------------------- images


def tar_of_dir(d, out):
    sh(["tar", "--numeric-owner", "--sort=name", "--mtime=@1600000000", "-C", d, "-cf", out, "."])


def busybox_tar(path):
    if os.path.exists(path):
        return path
    d = tempfile.mkdtemp(dir=CACHE)
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp", "data"]:
        os.makedirs(os.path.join(d, sub))
    shutil.copy("/bin/busybox", os.path.join(d, "bin/busybox"))
    for a in ["sh", "cat", "echo", "ls", "head", "wc"]:
        os.symlink("busybox", os.path.join(d, "bin", a))
    with open(os.path.join(d, "etc/motd"), "w") as f:
        f.write("hello\n")
    tar_of_dir(d, path + ".tmp")
    os.rename(path + ".tmp", path)
    shutil.rmtree(d)
    return path


def bigdata_tar(path, mb):
    if os.path.exists(path):
        return path
    d = tempfile.mkdtemp(dir=CACHE)
    os.makedirs(os.path.join(d, "data"))
    rnd = random.Random(42)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(4000)]
    for i in range(mb // 4):
        p = os.path.join(d, "data", f"f{i:04}.bin")
        if i % 2 == 0:  # incompressible half
            with open(p, "wb") as f:
                f.write(os.urandom(4 << 20))
        else:  # text half (compresses about 3:1)
            buf = bytearray()
            while len(buf) < 4 << 20:
                buf += b" ".join(rnd.choices(words, k=64)) + b"\n"
            with open(p, "wb") as f:
                f.write(buf[: 4 << 20])
    tar_of_dir(d, path + ".tmp")
    os.rename(path + ".tmp", path)
    shutil.rmtree(d)
    return path


def workloads(args):
    os.makedirs(CACHE, exist_ok=True)
    w = {}
    if "busybox" in args.images:
        w["busybox"] = {
            "layers": [busybox_tar(os.path.join(CACHE, "busybox.tar"))],
            "cmd": ["/bin/busybox", "echo", "hello"],
            "expect": "hello",
        }
    if "python" in args.images:
        tars = sh([os.path.join(ROOT, "scripts/python-image.sh")], timeout=3600).stdout.split()
        w["python"] = {
            "layers": tars,
            "cmd": ["/usr/bin/python3", "-c", 'print("hello")'],
            "expect": "hello",
        }
    if "bigdata" in args.images:
        n = args.bigdata_mb // 4
        k = -(-n * 4 // 5)  # at least 80% of the data layer's bytes
        w["bigdata"] = {
            "layers": [
                busybox_tar(os.path.join(CACHE, "busybox.tar")),
                bigdata_tar(os.path.join(CACHE, f"bigdata-{args.bigdata_mb}.tar"), args.bigdata_mb),
            ],
            "cmd": ["/bin/sh", "-c", f"ls /data | head -n {k} | while read f; do cat /data/$f; done | wc -c"],
            "expect": str(k * (4 << 20)),
        }
    return w


class Registry:
    def __init__(self, work):
        self.port = free_port()
        self.dir = os.path.join(work, "registry")
        os.makedirs(self.dir)
        cfg = os.path.join(work, "registry.yml")
        with open(cfg, "w") as f:
            f.write(
                f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {self.dir}}}}}\n"
                f"http: {{addr: 127.0.0.1:{self.port}}}\n"
            )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "registry.log"), "w")
        )
        wait_for(lambda: self._up(), what="registry")

    def _up(self):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=1)
            return True
        except Exception:
            return False

    def push_blob(self, repo, path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        digest = "sha256:" + h.hexdigest()
        base = f"http://127.0.0.1:{self.port}"
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/v2/{repo}/blobs/{digest}", method="HEAD"))
            return digest, os.path.getsize(path)
        except Exception:
            pass
        r = urllib.request.urlopen(urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST"))
        loc = r.headers["Location"]
        if not loc.startswith("http"):
            loc = base + loc
        sep = "&" if "?" in loc else "?"
        with open(path, "rb") as f:
            req = urllib.request.Request(
                f"{loc}{sep}digest={digest}", data=f, method="PUT",
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(os.path.getsize(path))},
            )
            urllib.request.urlopen(req)
        return digest, os.path.getsize(path)

    def push_image(self, repo, tag, layers, diff_ids, cmd):
        """layers: [(path, media_type, annotations)]; cmd: the config's Cmd (ctr's
        argument parser would take the workload's `-c` for one of its own flags)."""
        descs = []
        for path, mt, ann in layers:
            d, n = self.push_blob(repo, path)
            desc = {"mediaType": mt, "digest": d, "size": n}
            if ann:
                desc["annotations"] = ann
            descs.append(desc)
        config = {
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cpath = tempfile.mktemp(dir=CACHE)
        with open(cpath, "w") as f:
            json.dump(config, f)
        cd, cn = self.push_blob(repo, cpath)
        os.unlink(cpath)
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
            "layers": descs,
        }
        body = json.dumps(manifest).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v2/{repo}/manifests/{tag}", data=body, method="PUT",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        urllib.request.urlopen(req)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def diff_id(tar):
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return "sha256:" + h.hexdigest()


def gzip_layer(tar):
    out = tar + ".gz"
    if not os.path.exists(out):
        if shutil.which("pigz"):
            with open(out + ".tmp", "wb") as f:
                subprocess.run(["pigz", "-6", "-n", "-c", tar], stdout=f, check=True)
        else:
            with open(tar, "rb") as src, gzip.GzipFile(out + ".tmp", "wb", 6, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.rename(out + ".tmp", out)
    return out


def esgz_layer(tar, prioritized=None, tag="esgz"):
    out = f"{tar}.{tag}"
    meta = out + ".json"
    if not (os.path.exists(out) and os.path.exists(meta)):
        cmd = [LAZYSNAP, "layer", "convert", tar, out, "--json"]
        if prioritized:
            cmd += ["--prioritized", prioritized]
        r = sh(cmd)
        with open(meta, "w") as f:
            f.write(r.stdout)
    with open(meta) as f:
        m = json.load(f)
    ann = {
        "containerd.io/snapshot/stargz/toc.digest": m["toc_digest"],
        "io.containers.estargz.uncompressed-size": str(m["uncompressed_size"]),
    }
    return out, ann


def record_access(name, wl, work):
    """The files the workload opens, in order: the image is mounted lazily by
    `lazysnap mount` and the command runs in it under strace (chroot, no network)."""
    out = os.path.join(CACHE, f"{name}.access")
    if os.path.exists(out):
        return out
    if not shutil.which("strace"):
        raise RuntimeError("the optimized mode needs strace (apt install strace) to record accesses")
    mnt = os.path.join(work, f"rec-{name}")
    os.makedirs(mnt)
    # stack the layers with overlayfs over plain extractions (the access list does
    # not depend on how the files are served)
    lowers = []
    for i, t in enumerate(wl["layers"]):
        d = os.path.join(work, f"rec-{name}-l{i}")
        os.makedirs(d)
        sh(["tar", "--numeric-owner", "-xpf", t, "-C", d])
        lowers.append(d)
    upper, wdir = os.path.join(work, f"rec-{name}-u"), os.path.join(work, f"rec-{name}-w")
    os.makedirs(upper)
    os.makedirs(wdir)
    sh(["mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},workdir={wdir}", mnt])
    try:
        for sub in ["proc", "dev"]:
            os.makedirs(os.path.join(mnt, sub), exist_ok=True)
        trace = os.path.join(work, f"rec-{name}.strace")
        sh(["unshare", "--net", "strace", "-f", "-qq", "-e", "trace=open,openat,execve,stat,newfstatat",
            "-o", trace, "chroot", mnt] + wl["cmd"], timeout=300)
        seen, order = set(), []
        import re
        pat = re.compile(r'(?:openat\(AT_FDCWD|open\(|execve\(|newfstatat\(AT_FDCWD|stat\()[, ]*"([^"]+)"[^=]*= (\d+|0)')
        for line in open(trace):
            m = pat.search(line)
            if not m:
                continue
            full = os.path.realpath(os.path.join(mnt, m.group(1).lstrip("/")))
            if not full.startswith(mnt + "/") or not os.path.isfile(full):
                continue
            p = full[len(mnt):]
            if p not in seen:
                seen.add(p)
                order.append(p)
    finally:
        detach_under(os.path.dirname(mnt))
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    with open(out, "w") as f:
        f.write("\n".join(order) + "\n")
    log(f"{name}: recorded {len(order)} files opened by the workload")
    return out


# ---------------------------------------------------------------- daemons


class Stack:
    """containerd + lazysnap (+ a peer) for one cold run."""

    def __init__(self, work, mode, peer, lazy_config):
        self.work = work
        self.dir = tempfile.mkdtemp(dir=work, prefix=f"run-{mode}-")
        self.procs = []
        self.csock = os.path.join(self.dir, "containerd.sock")
        lsock = os.path.join(self.dir, "lazysnap.sock")
        cfg = os.path.join(self.dir, "lazysnap.toml")
        with open(cfg, "w") as f:
            f.write(f'socket = "{lsock}"\nroot = "{self.dir}/lazysnap"\n{lazy_config}')
        self.spawn([LAZYSNAP, "serve", "--config", cfg], "lazysnap.log")
        wait_for(lambda: os.path.exists(lsock), what="lazysnap")
        plugins = f'[proxy_plugins.lazysnap]\n  type = "snapshot"\n  address = "{lsock}"\n'
        if peer:
            name, binary = peer
            psock = os.path.join(self.dir, f"{name}.sock")
            pcfg = os.path.join(self.dir, f"{name}.toml")
            with open(pcfg, "w") as f:
                f.write("[blob]\nchunk_size = 65536\n")
            self.spawn([binary, "-root", f"{self.dir}/{name}", "-address", psock, "-config", pcfg], f"{name}.log")
            wait_for(lambda: os.path.exists(psock), what=name)
            plugins += f'[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{psock}"\n'
        ccfg = os.path.join(self.dir, "containerd.toml")
        with open(ccfg, "w") as f:
            f.write(
                f'version = 2\nroot = "{self.dir}/containerd/root"\nstate = "{self.dir}/containerd/state"\n'
                f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{self.csock}"\n'
                f'[ttrpc]\n  address = "{self.csock}.ttrpc"\n[debug]\n  address = "{self.dir}/debug.sock"\n'
                f'[metrics]\n  address = ""\n{plugins}'
            )
        self.spawn(["containerd", "--config", ccfg], "containerd.log")
        wait_for(lambda: sh(["ctr", "-a", self.csock, "version"], check=False).returncode == 0, what="containerd")

    def spawn(self, cmd, logname):
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                           stderr=open(os.path.join(self.dir, logname), "w")))

    def ctr(self, *a, timeout=900):
        return sh(["ctr", "-a", self.csock, "-n", NS] + list(a), timeout=timeout)

    def stop(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        detach_under(self.dir)
        if os.environ.get("LAZYSNAP_BENCH_KEEP") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    def __init__(self, work, target_port, mbit, delay_ms):
        self.port = free_port()
        self.stats = os.path.join(work, f"proxy-{self.port}.json")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bench/linkproxy.py"), str(self.port), f"127.0.0.1:{target_port}",
             "--mbit", str(mbit), "--delay-ms", str(delay_ms), "--stats", self.stats])
        wait_for(lambda: self._up(), what="link proxy")

    def _up(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def down_bytes(self):
        try:
            os.unlink(self.stats)
        except FileNotFoundError:
            pass
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: os.path.exists(self.stats), 5, "proxy stats")
        time.sleep(0.05)
        with open(self.stats) as f:
            return json.load(f)["down"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


# ---------------------------------------------------------------- runs


def one_run(work, proxy, mode, image, wl, peer, bench_cfg):
    lazy_cfg = "[layer]\n"
    if mode == "adaptive":
        lazy_cfg += f"\n[unlazy]\nread_fraction = {bench_cfg.read_fraction}\ninterval_ms = 200\n"
    stack = Stack(work, mode, peer if mode == (peer[0] if peer else None) else None, lazy_cfg)
    try:
        snap = {"overlayfs": "overlayfs"}.get(mode, "lazysnap")
        if peer and mode == peer[0]:
            snap = peer[0]
        ref = f"127.0.0.1:{proxy.port}/{image}"
        before = proxy.down_bytes()
        t0 = time.monotonic()
        if mode == "overlayfs":
            stack.ctr("image", "pull", "--plain-http", "--snapshotter", snap, ref)
        else:
            sh([CTR_REMOTE, "-a", stack.csock, "-n", NS, "image", "rpull", "--plain-http", "--snapshotter", snap, ref])
        t1 = time.monotonic()
        cid = f"w{os.getpid()}-{int(time.time() * 1000)}"
        stack.ctr("container", "create", "--snapshotter", snap, "--net-host", ref, cid)
        t2 = time.monotonic()
        out = stack.ctr("task", "start", cid).stdout
        t3 = time.monotonic()
        if wl["expect"] not in out:
            raise RuntimeError(f"{image} in {mode}: unexpected output {out[-300:]!r}")
        transferred = proxy.down_bytes() - before
        stack.ctr("container", "delete", cid)
        return {"pull": t1 - t0, "create": t2 - t1, "run": t3 - t2, "total": t3 - t0, "bytes": transferred}
    finally:
        stack.stop()


def pct(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


COLORS = {"pull": "#4e79a7", "create": "#f28e2b", "run": "#59a14f"}


def svg_chart(summary, links, images, modes, path):
    bar, gap, group_gap = 22, 4, 26
    left, top, height = 70, 40, 260
    panels = []
    x = left
    maxv = max((s["total_p50"] for s in summary), default=1) or 1
    scale = height / maxv
    parts = []
    for link in links:
        x0 = x
        for image in images:
            gx = x
            for mode in modes:
                s = next((s for s in summary if s["link"] == link and s["image"] == image and s["mode"] == mode), None)
                if s:
                    y = top + height
                    for phase in ["pull", "create", "run"]:
                        h = s[f"{phase}_p50"] * scale
                        y -= h
                        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{COLORS[phase]}"><title>{link} {image} {mode} {phase} {s[phase + "_p50"]:.2f} s</title></rect>')
                    parts.append(f'<text x="{x + bar / 2}" y="{y - 3:.1f}" font-size="9" text-anchor="middle">{s["total_p50"]:.1f}</text>')
                    parts.append(f'<text x="{x + bar / 2}" y="{top + height + 10}" font-size="8" text-anchor="end" transform="rotate(-45 {x + bar / 2} {top + height + 10})">{mode}</text>')
                x += bar + gap
            parts.append(f'<text x="{(gx + x) / 2}" y="{top + height + 62}" font-size="11" text-anchor="middle">{image}</text>')
            x += group_gap
        parts.append(f'<text x="{(x0 + x) / 2}" y="{top - 18}" font-size="13" font-weight="bold" text-anchor="middle">{link}</text>')
        panels.append((x0, x))
        x += 30
    width = x + 20
    axis = [f'<line x1="{left - 6}" y1="{top}" x2="{left - 6}" y2="{top + height}" stroke="#333"/>']
    step = max(1, round(maxv / 5))
    v = 0
    while v <= maxv:
        y = top + height - v * scale
        axis.append(f'<text x="{left - 10}" y="{y + 3:.1f}" font-size="9" text-anchor="end">{v}s</text>')
        axis.append(f'<line x1="{left - 6}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#ddd"/>')
        v += step
    legend = []
    lx = left
    for phase, c in COLORS.items():
        legend.append(f'<rect x="{lx}" y="{top + height + 78}" width="10" height="10" fill="{c}"/><text x="{lx + 14}" y="{top + height + 87}" font-size="10">{phase}</text>')
        lx += 70
    total_h = top + height + 100
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" font-family="sans-serif">\n')
        f.write('<rect width="100%" height="100%" fill="white"/>\n')
        f.write("\n".join(axis + parts + legend))
        f.write(f'\n<text x="{left}" y="14" font-size="12">cold start, p50 seconds (pull + create + run)</text>\n</svg>\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--links", default="local,wan")
    ap.add_argument("--images", default="busybox,python,bigdata")
    ap.add_argument("--modes", default="overlayfs,lazy,optimized,adaptive")
    ap.add_argument("--peer", help="NAME=BINARY of another lazy snapshotter (stargz-snapshotter's containerd-stargz-grpc)")
    ap.add_argument("--bigdata-mb", type=int, default=512)
    ap.add_argument("--read-fraction", type=float, default=0.3)
    ap.add_argument("--wan-mbit", type=float, default=100)
    ap.add_argument("--wan-delay-ms", type=float, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    ap.add_argument("--benchmarks", help="write a section into this BENCHMARKS.md")
    args = ap.parse_args()
    args.images = args.images.split(",")
    modes = args.modes.split(",")
    peer = None
    if args.peer:
        name, binary = args.peer.split("=", 1)
        peer = (name, binary)
        modes.append(name)
    links = args.links.split(",")
    if os.geteuid() != 0:
        sys.exit("coldstart: needs root")
    if not os.path.exists(LAZYSNAP):
        sh(["cargo", "build", "--release", "--quiet"], cwd=ROOT, timeout=3600)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lazysnap-coldstart-", dir="/var/tmp")
    log(f"work directory {work}")
    reg = Registry(work)
    proxies = []
    rows = []
    try:
        wls = workloads(args)
        for name, wl in wls.items():
            tars = wl["layers"]
            ids = [diff_id(t) for t in tars]
            gz = "application/vnd.oci.image.layer.v1.tar+gzip"
            reg.push_image(name, "gzip", [(gzip_layer(t), gz, None) for t in tars], ids, wl["cmd"])
            reg.push_image(name, "esgz", [(p, gz, a) for p, a in (esgz_layer(t) for t in tars)], ids, wl["cmd"])
            if "optimized" in modes:
                acc = record_access(name, wl, work)
                with open(acc, "rb") as f:
                    tag = "opt-" + hashlib.sha256(f.read()).hexdigest()[:12]
                reg.push_image(name, "opt", [(p, gz, a) for p, a in (esgz_layer(t, acc, tag) for t in tars)], ids, wl["cmd"])
            log(f"{name}: pushed")
        for link in links:
            if link == "local":
                proxy = Proxy(work, reg.port, 0, 0)
            else:
                proxy = Proxy(work, reg.port, args.wan_mbit, args.wan_delay_ms)
            proxies.append(proxy)
            for name, wl in wls.items():
                for mode in modes:
                    if mode == "adaptive" and name != "bigdata":
                        continue
                    tag = {"overlayfs": "gzip", "optimized": "opt"}.get(mode, "esgz")
                    for i in range(args.runs):
                        r = one_run(work, proxy, mode, f"{name}:{tag}", wl, peer, args)
                        r.update(link=link, image=name, mode=mode, rep=i)
                        rows.append(r)
                        log(f"{link} {name} {mode} #{i}: pull {r['pull']:.2f} create {r['create']:.2f} run {r['run']:.2f} = {r['total']:.2f} s, {r['bytes'] / 1e6:.1f} MB")
    finally:
        for p in proxies:
            p.stop()
        reg.stop()
        detach_under(work)
        if os.environ.get("LAZYSNAP_BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)

    csv = os.path.join(args.out, "coldstart.csv")
    with open(csv, "w") as f:
        f.write("link,image,mode,rep,pull_s,create_s,run_s,total_s,bytes\n")
        for r in rows:
            f.write(f"{r['link']},{r['image']},{r['mode']},{r['rep']},{r['pull']:.3f},{r['create']:.3f},{r['run']:.3f},{r['total']:.3f},{r['bytes']}\n")
    summary = []
    for link in links:
        for name in args.images:
            for mode in modes:
                rs = [r for r in rows if (r["link"], r["image"], r["mode"]) == (link, name, mode)]
                if not rs:
                    continue
                s = {"link": link, "image": name, "mode": mode, "n": len(rs)}
                for k in ["pull", "create", "run", "total"]:
                    s[f"{k}_p50"] = pct([r[k] for r in rs], 50)
                s["total_p95"] = pct([r["total"] for r in rs], 95)
                s["bytes"] = statistics.median([r["bytes"] for r in rs])
                summary.append(s)
    svg = os.path.join(args.out, "coldstart.svg")
    svg_chart(summary, links, args.images, modes, svg)
    lines = [
        "| link | image | mode | pull p50 | create p50 | run p50 | total p50 | total p95 | vs overlayfs | MB transferred |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        base = next((b for b in summary if (b["link"], b["image"], b["mode"]) == (s["link"], s["image"], "overlayfs")), None)
        ratio = f"{base['total_p50'] / s['total_p50']:.2f}× faster" if base and s["mode"] != "overlayfs" else "1.00"
        if base and s["mode"] != "overlayfs" and s["total_p50"] > base["total_p50"]:
            ratio = f"{s['total_p50'] / base['total_p50']:.2f}× slower"
        lines.append(
            f"| {s['link']} | {s['image']} | {s['mode']} | {s['pull_p50']:.2f} | {s['create_p50']:.2f} | {s['run_p50']:.2f} | "
            f"**{s['total_p50']:.2f}** | {s['total_p95']:.2f} | {ratio} | {s['bytes'] / 1e6:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.benchmarks:
        cmd = " ".join(["bench/coldstart.py"] + sys.argv[1:])
        section = os.path.join(args.out, "coldstart.md")
        with open(section, "w") as f:
            f.write("## Cold start (#9)\n\n")
            f.write(f"`{cmd}` — {args.runs} cold runs per cell (fresh containerd store and lazysnap root/cache each run). ")
            f.write(f"Links: `local` = loopback through the counting proxy; `wan` = {args.wan_mbit:g} Mbit/s with "
                    f"{args.wan_delay_ms:g} ms one-way delay (bench/linkproxy.py). Seconds; ratios are of p50 totals against "
                    "containerd's overlayfs full pull in the same run. CSV: bench/results/coldstart.csv.\n\n")
            f.write(table + "\n\n![cold start](bench/results/coldstart.svg)\n")
        subprocess.run([sys.executable, os.path.join(ROOT, "bench/replace-section.py"), args.benchmarks,
                        "## Cold start (#9)", section], check=True)


if __name__ == "__main__":
    main()
