#!/usr/bin/env python3
"""Kill a real `canopy train` run with SIGKILL, restart it with --resume, and check that
every exported head is bitwise identical to a run that was never interrupted (on CPU).
`canopy inspect` on the run's out_dir says where a killed run stands and the command that goes
on (the test runs it), finds flipped bits with --verify, and names the process of a run in
progress.

    test_train_resume.py --canopy build/runners/canopy
"""
import json
import os
import signal
import subprocess
import sys
import time


from support import check, finish, flip, kill_when, start, tiny_conv_trunk, tiny_trunk_sections


def describe_done(st):
    """What canopy says of a checkpoint's position: "2 epochs and 90 steps done"."""
    e, s = st["epoch"], st["step"]
    text = f"{e} epoch{'' if e == 1 else 's'}"
    return (text + f" and {s} step{'' if s == 1 else 's'}" if s else text) + " done"




def main():
    canopy, work, trunk = start("canopy-train-resume-", tiny_conv_trunk, "tiny.pt")
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, 3000, 300, pooling="flatten") + f"""[cache]
path = {work}/cache
[train]
batch_size = 16
epochs = 4
checkpoint_steps = 25
[task.a_linear]
head = linear
optimizer = sgd
lr = 0.01
[task.b_mlp]
head = mlp
head.hidden = 64
head.dropout = 0.3
lr = 0.001
[task.c_adamw]
head = mlp
head.hidden = 32,16
head.dropout = 0.1
optimizer = adamw
weight_decay = 0.01
""")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"cache built {r.stderr[-300:]}")
    t = time.time()
    r = subprocess.run([canopy, "train", "--config", config, "--set", f"train.out_dir={work}/ref", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"uninterrupted training ({time.time() - t:.1f}s) {r.stderr[-300:]}")

    out = f"{work}/cut"
    state = os.path.join(out, "checkpoint", "state.json")
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    kills = []
    for target in ((1, 40), (2, 90)):  # (epoch, step) reached before each kill
        returncode, st = kill_when(cmd + (["--resume"] if kills else []), state,
                                   lambda st: (st["epoch"], st["step"]) >= target)
        seen = (st["epoch"], st["step"]) if st else None
        check(returncode == -signal.SIGKILL and seen is not None, f"training killed by SIGKILL after checkpoint {seen}")
        kills.append(seen)
    # canopy inspect on the killed run's out_dir: where it stands, each head, and the command
    # that goes on, which is then the one run.
    r = subprocess.run([canopy, "inspect", out], capture_output=True, text=True)
    st = json.load(open(state))
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if l.split()[:1] in (["a_linear"], ["b_mlp"], ["c_adamw"])}
    resume = f"canopy train --config {out}/config.ini --resume"
    check(r.returncode == 0 and "status      stopped before its end" in r.stdout and f"`{resume}`" in r.stdout and
          describe_done(st) in r.stdout and "exported    none yet" in r.stdout and
          all(rows.get(t["name"], [""] * 3)[1:3] == ["training", f"{t['epochs']}/4"] for t in st["tasks"]),
          f"canopy inspect on the killed run says where it stands, each head's state and epochs, and the command "
          f"that goes on:\n{r.stdout}{r.stderr[-300:]}")
    r = subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True)
    doc = json.loads(r.stdout) if r.returncode == 0 else {}
    check(doc.get("status") == "stopped" and doc.get("resume_command") == resume and
          doc.get("checkpoint", {}).get("epoch") == st["epoch"] and doc["checkpoint"]["step"] == st["step"] and
          [(h["name"], h["state"], h["epochs"], h["epochs_planned"]) for h in doc["heads"]] ==
          [(t["name"], "training", t["epochs"], 4) for t in st["tasks"]] and doc["exported"] == [] and doc["ok"],
          f"... and --json says the same for scripts: status {doc.get('status')}, {len(doc.get('heads', []))} heads")
    r = subprocess.run([canopy] + resume.split()[1:] + ["--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and "resuming from the checkpoint" in r.stderr,
          f"the command inspect gave finishes the run: {[l for l in r.stderr.splitlines() if 'resuming' in l]}")
    for name in ("a_linear", "b_mlp", "c_adamw"):
        ref = open(f"{work}/ref/heads/{name}.safetensors", "rb").read()
        cut = open(f"{out}/heads/{name}.safetensors", "rb").read()
        check(ref == cut, f"{name}: weights bitwise identical to the uninterrupted run ({len(ref)} bytes)")
        ref_card = json.load(open(f"{work}/ref/heads/{name}.json"))
        cut_card = json.load(open(f"{out}/heads/{name}.json"))
        check(ref_card == cut_card and len(cut_card["per_class"]) == 10,
              f"{name}: card (metrics, per-class report) equal to the uninterrupted run's")
    ref_lines = [json.loads(l) for l in open(f"{work}/ref/metrics.jsonl")]
    cut_lines = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    strip = lambda ls: [(l["epoch"], l["task"], l["eval_accuracy"], l["train_loss"]) for l in ls]
    check(strip(ref_lines) == strip(cut_lines), f"metrics.jsonl has each epoch once, equal to the uninterrupted run ({len(cut_lines)} lines)")
    # A flipped bit in a head's checkpoint file, or in state.json, is found by the checksums
    # state.json records, before anything is loaded; resuming the finished run from the intact
    # files exports the same heads again.
    import glob
    import shutil
    ckpt = os.path.join(out, "checkpoint")
    shutil.copytree(ckpt, f"{work}/ckpt-intact")
    head_file = sorted(glob.glob(os.path.join(ckpt, "b_mlp.*.pt")))[0]

    def flipped(path, offset, bit):
        shutil.rmtree(ckpt)
        shutil.copytree(f"{work}/ckpt-intact", ckpt)
        flip(path, offset, bit)
        return subprocess.run(cmd + ["--resume"], capture_output=True, text=True)

    r = flipped(head_file, os.path.getsize(head_file) // 2, 4)
    check(r.returncode == 1 and os.path.basename(head_file) in r.stderr and "does not match the checksum" in r.stderr,
          f"a flipped bit in {os.path.basename(head_file)}: --resume refuses it ({r.stderr.strip()[-220:]})")
    r = subprocess.run([canopy, "inspect", out, "--verify"], capture_output=True, text=True)
    check(r.returncode == 1 and f"CORRUPT     checkpoint file '{head_file}' does not match the checksum" in r.stdout,
          f"... and canopy inspect --verify finds it (exit {r.returncode}): "
          f"{[l for l in r.stdout.splitlines() if 'CORRUPT' in l]}")
    text = open(state).read()
    r = flipped(state, text.index('"epoch": ') + len('"epoch": '), 2)  # the epoch's digit, e.g. 4 -> 6
    check(r.returncode == 1 and "state.json' does not match its checksum" in r.stderr,
          f"a flipped bit in state.json's epoch: --resume refuses it ({r.stderr.strip()[-220:]})")
    shutil.rmtree(ckpt)
    shutil.copytree(f"{work}/ckpt-intact", ckpt)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    check(r.returncode == 0 and all(open(f"{work}/ref/heads/{n}.safetensors", "rb").read() ==
                                    open(f"{out}/heads/{n}.safetensors", "rb").read() for n in ("a_linear", "b_mlp")),
          f"the intact checkpoint resumes the finished run to the same heads ({r.stderr.strip()[-160:]})")
    r = subprocess.run([canopy, "inspect", out, "--verify"], capture_output=True, text=True)
    check(r.returncode == 0 and "status      finished" in r.stdout and "verified    state.json and its 3 files" in r.stdout
          and "verified    every exported card matches" in r.stdout and "CORRUPT" not in r.stdout,
          f"canopy inspect --verify on the finished run: finished, checkpoint and exports intact (exit {r.returncode})")
    weights = f"{out}/heads/c_adamw.safetensors"
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) - 3)
        b = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b ^ 1]))
    r = subprocess.run([canopy, "inspect", out, "--verify"], capture_output=True, text=True)
    check(r.returncode == 1 and f"CORRUPT     weights '{weights}' have sha256 " in r.stdout,
          f"a flipped bit in an exported head's weights: canopy inspect --verify finds it (exit {r.returncode})")

    # While a run trains (stopped with SIGSTOP once it has a checkpoint), inspect says who holds it.
    live = f"{work}/live"
    p = subprocess.Popen([canopy, "train", "--config", config, "--set", f"train.out_dir={live}", "--progress", "quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not os.path.exists(f"{live}/checkpoint/state.json"):
        time.sleep(0.005)
    p.send_signal(signal.SIGSTOP)
    r = subprocess.run([canopy, "inspect", live], capture_output=True, text=True)
    as_json = subprocess.run([canopy, "inspect", live, "--json"], capture_output=True, text=True)
    p.send_signal(signal.SIGCONT)
    p.kill()
    p.wait()
    check(r.returncode == 0 and f"status      running: canopy train, pid {p.pid} is training in it now" in r.stdout,
          f"canopy inspect on a run in progress names the process: "
          f"{[l for l in r.stdout.splitlines() if 'status' in l]}{r.stderr[-200:]}")
    doc = json.loads(as_json.stdout) if as_json.returncode == 0 else {}
    check(doc.get("status") == "running" and doc.get("holder") == f"canopy train, pid {p.pid}",
          f"... and --json: status {doc.get('status')}, holder {doc.get('holder')}")

    r = subprocess.run(cmd + ["--resume", "--set", "task.a_linear.lr=0.02"], capture_output=True, text=True)
    check(r.returncode == 2 and "configuration differs" in r.stderr and "task.a_linear.lr (0.01 -> 0.02)" in r.stderr,
          f"--resume with a changed config is refused, naming the change: {r.stderr.strip().splitlines()[-1:]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
