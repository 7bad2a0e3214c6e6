#!/usr/bin/env python3
# One NIXL agent of `kvwire bench --baseline nixl` (lib/cli/nixl.ts drives two of these: a target
# and an initiator). It moves the same scattered blocks kvwire's bench moves, DRAM<->DRAM over
# NIXL's UCX backend, and answers the driver in JSON lines.
#
#   nixl-peer.py probe      prints {"ok": true, "module": ..., "version": ...} or {"ok": false, "error": ...}
#   nixl-peer.py target     reads commands: init, check, exit
#   nixl-peer.py initiator  reads commands: init, verify, run, exit
#
# The protocol goes to a private copy of stdout; fd 1 itself is pointed at stderr, so whatever NIXL
# or UCX print cannot corrupt it. Every answer is flushed as soon as it is known: NIXL processes
# may crash at exit, and the driver keeps what was said before that.
import base64
import json
import os
import sys
import time

_proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def say(**fields):
    _proto.write(json.dumps(fields) + "\n")
    _proto.flush()


def load_nixl():
    """The NIXL Python API: `nixl` (the meta package) or a CUDA-flavoured wheel's own module."""
    errors = []
    for name in ("nixl", "nixl_cu12", "nixl_cu13"):
        try:
            mod = __import__(name, fromlist=["nixl_agent"])
            getattr(mod, "nixl_agent")
            return name, mod
        except Exception as e:  # ImportError, or a broken install
            errors.append(f"{name}: {e}")
    raise ImportError("; ".join(errors))


def nixl_version(name):
    try:
        from importlib.metadata import version

        for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
            try:
                return version(dist)
            except Exception:
                pass
    except Exception:
        pass
    return "unknown"


def scatter(slots, count, seed):
    """Same permutation as kvwire's bench (lib/cli/bench-node.ts `scatter`): seeded LCG shuffle."""
    a = list(range(slots))
    x = seed & 0xFFFFFFFF
    for i in range(slots - 1, 0, -1):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        j = x % (i + 1)
        a[i], a[j] = a[j], a[i]
    return [a[i % slots] for i in range(count)]


def row(np, block, mult):
    """Byte i of every block: (i * mult) & 0xff, periodic in 256."""
    return np.resize(((np.arange(256) * mult) & 0xFF).astype(np.uint8), block)


def fill(np, pool, slots, block, mult, seed):
    """Slot s holds row(mult) + (13 s + seed), modulo 256 (every page written: faulted in)."""
    view = pool[: slots * block].reshape(slots, block)
    view[:] = row(np, block, mult)[None, :]
    view += (((np.arange(slots) * 13) + seed) & 0xFF).astype(np.uint8)[:, None]


def check(np, pool, block, dst_slots, src_slots, mult, seed):
    """Number of blocks whose destination slot does not hold its source slot's bytes."""
    bad = 0
    r = row(np, block, mult)
    for d, s in zip(dst_slots, src_slots):
        got = pool[d * block : (d + 1) * block]
        if not np.array_equal(got - r, np.full(block, (s * 13 + seed) & 0xFF, dtype=np.uint8)):
            bad += 1
    return bad


def make_agent(mod, name, progress):
    """
    A NIXL agent with the UCX backend. progress: 'event' = progress thread sleeping in poll() on the
    workers' event fds with a 1 ms timeout (pthrDelay 1000 us); 'spin' = the Python API's own
    setting (progress thread, pthrDelay 0: poll() with a 0 ms timeout, which spins a core).
    The Python API (nixl_agent) hard-codes pthrDelay = 0, so for 'event' the bindings' agent
    constructor is wrapped while the agent is built, to set the delay on the config it is given.
    """
    conf = mod.nixl_agent_config(enable_prog_thread=True, backends=["UCX"])
    api = sys.modules[mod.nixl_agent.__module__]
    bind = getattr(api, "nixlBind", None)
    delay_us = 1000 if progress == "event" else 0
    used = {"progThread": True, "pthrDelayUs": 0}
    if delay_us and bind is not None and hasattr(bind, "nixlAgent"):
        original = bind.nixlAgent

        def build(agent_name, agent_config):
            agent_config.pthrDelay = delay_us
            used["pthrDelayUs"] = agent_config.pthrDelay
            return original(agent_name, agent_config)

        bind.nixlAgent = build
        try:
            agent = mod.nixl_agent(name, conf)
        finally:
            bind.nixlAgent = original
    else:
        agent = mod.nixl_agent(name, conf)
    if "UCX" not in getattr(agent, "backends", {"UCX": 1}):
        raise RuntimeError("NIXL has no UCX backend here (plugin missing?)")
    return agent, used


def descs(np, base, block, slots):
    d = np.zeros((len(slots), 3), dtype=np.uint64)
    d[:, 0] = [base + s * block for s in slots]
    d[:, 1] = block
    return d


def main():
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "probe":
        try:
            name, _ = load_nixl()
            import numpy  # noqa: F401

            say(ok=True, module=name, version=nixl_version(name))
        except Exception as e:
            say(ok=False, error=str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        return
    if role not in ("target", "initiator"):
        say(ok=False, error=f"unknown role '{role}'")
        return
    import numpy as np

    modname, mod = load_nixl()
    agent = None
    pool = None
    st = {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        m = json.loads(line)
        cmd = m.get("cmd")
        try:
            if cmd == "exit":
                break
            if cmd == "init":
                # Pool: `slots` blocks (2 x batch for 'spread', 1 for 'hot'), filled with this side's pattern.
                block, slots = m["block"], m["slots"]
                pool = np.empty(block * slots, dtype=np.uint8)
                fill(np, pool, slots, block, m["mult"], m["fill"])
                agent, used = make_agent(mod, m["name"], m["progress"])
                base = pool.ctypes.data
                agent.register_memory([(base, pool.nbytes, 0, "kv")], "DRAM")
                st = {"block": block, "slots": slots, "base": base}
                out = {"ok": True, "module": modname, "version": nixl_version(modname), **used, "base": base}
                if role == "target":
                    out["metadata"] = base64.b64encode(agent.get_agent_metadata()).decode()
                say(**out)
            elif cmd == "check" and role == "target":
                # After a WRITE: the batch's destination slots hold the initiator's source blocks.
                dst = scatter(st["slots"], m["batch"], m["dstScatter"])
                src = scatter(st["slots"], m["batch"], m["srcScatter"])
                deadline = time.monotonic() + 2
                while True:
                    bad = check(np, pool, st["block"], dst, src, m["srcMult"], m["srcFill"])
                    if not bad or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                say(ok=bad == 0, bad=bad, blocks=m["batch"])
            elif cmd == "verify" and role == "initiator":
                # Connect, prepare the batch (once; NIXL's hot path reposts a prepared request), move it once and check it.
                peer = agent.add_remote_agent(base64.b64decode(m["metadata"]))
                block, slots, batch = st["block"], st["slots"], m["batch"]
                local_slots = scatter(slots, batch, m["localScatter"])
                remote_slots = scatter(slots, batch, m["remoteScatter"])
                local = agent.get_xfer_descs(descs(np, st["base"], block, local_slots), "DRAM")
                remote = agent.get_xfer_descs(descs(np, m["remoteBase"], block, remote_slots), "DRAM")
                op = "WRITE" if m["op"] == "write" else "READ"
                t0 = time.monotonic()
                while True:
                    try:
                        handle = agent.initialize_xfer(op, local, remote, peer)
                        break
                    except Exception:
                        # The remote's metadata may still be settling in; retry briefly.
                        if time.monotonic() - t0 > 10:
                            raise
                        time.sleep(0.05)
                st.update(handle=handle, bytes=batch * block, timeout=m.get("batchTimeoutS", 30))
                one_batch(agent, st)
                bad = 0
                if m["op"] == "read":
                    bad = check(np, pool, block, local_slots, remote_slots, m["srcMult"], m["srcFill"])
                say(ok=bad == 0, bad=bad, blocks=batch, checked="local" if m["op"] == "read" else "remote")
            elif cmd == "run" and role == "initiator":
                for _ in range(2):
                    one_batch(agent, st)  # warm-up
                for r in range(m["runs"]):
                    t0 = time.perf_counter()
                    n = 0
                    while n < 3 or time.perf_counter() - t0 < m["runMs"] / 1e3:
                        one_batch(agent, st)
                        n += 1
                    dt = time.perf_counter() - t0
                    say(run=r, gbps=n * st["bytes"] / dt / 1e9, batches=n, seconds=dt)
                say(ok=True, done=True)
            else:
                say(ok=False, error=f"unknown command '{cmd}' for {role}")
        except Exception as e:
            say(ok=False, error=f"{type(e).__name__}: {e}")
    # NIXL's teardown is known to crash at exit: everything has been said, leave without it.
    _proto.flush()
    os._exit(0)


def one_batch(agent, st):
    h = st["handle"]
    state = agent.transfer(h)
    deadline = time.monotonic() + st["timeout"]
    while state == "PROC":
        state = agent.check_xfer_state(h)
        if state == "PROC" and time.monotonic() > deadline:
            raise TimeoutError(f"a batch did not finish in {st['timeout']} s")
    if state != "DONE":
        raise RuntimeError(f"NIXL transfer state {state}")


if __name__ == "__main__":
    main()
