"""The `kemari` command line (DESIGN.md section 5): thin verbs over the daemon."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import paths
from .config import VmConfig, load_config, node_addresses, with_overrides
from .control import NotRunning, request
from .errors import KemariError


def _run(args: argparse.Namespace) -> int:
    from .standalone import run
    config = load_config(args.config)
    return run(config, restore=Path(args.restore).resolve() if args.restore else None)


def _get_status(name: str) -> dict:
    try:
        reply = request(paths.socket_path(name), "status", timeout=10)
    except NotRunning:
        reply = {"name": name, "pid": None, "role": "stopped", "state": "stopped",
                 **_stopped_promotability(name)}
    reply.pop("ok", None)
    return reply


def _stopped_promotability(name: str) -> dict:
    """What the node's state file says, so a cluster agent can score a stopped node."""
    from .replication.state_store import StateFileCorrupt, StateStore
    try:
        state = StateStore(paths.state_dir() / name).load()
    except (StateFileCorrupt, OSError) as exc:
        return {"promotable": False, "promote_blocker": f"state file unreadable: {exc}"}
    return {"generation": state.generation, "checkpoint_seq": state.checkpoint_seq,
            "has_checkpoint": False, "consistent": state.consistent,
            "outdated": state.outdated, "promotable": False, "promote_blocker": "not running"}


def _watch(args: argparse.Namespace) -> int:
    """Redraw one status line (with the full sync's progress bar) until synced or ^C."""
    import time

    from .progress import line
    last = ""
    while True:
        st = _get_status(args.name)
        text = line(st)
        sys.stdout.write("\r" + text.ljust(len(last)))
        sys.stdout.flush()
        last = text
        if st["role"] == "stopped" or (args.until_synced and st["state"] == "synced"):
            sys.stdout.write("\n")
            return 0 if st["role"] != "stopped" else 3
        time.sleep(0.2)


def _status(args: argparse.Namespace) -> int:
    if args.watch or args.until_synced:
        return _watch(args)
    reply = _get_status(args.name)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(f"{reply['name']}: {reply['role']}, {reply['state']}"
              + (f" (pid {reply['pid']})" if reply.get("pid") else ""))
        for key in ("peer", "generation", "checkpoint_seq", "checkpoints"):
            if reply.get(key) is not None:
                print(f"  {key}: {reply[key]}")
        if latency := reply.get("cpu_latency"):
            held = "held" if latency["held"] else f"NOT held: {latency['error']}"
            print(f"  cpu_latency: {latency['requested_us']} us, {held}")
    return 0 if reply["role"] != "stopped" else 3


STOP_WAIT_S = 60


def _stop(args: argparse.Namespace) -> int:
    """Returns once the daemon is gone (a cluster may start it again at once)."""
    sock = paths.socket_path(args.name)
    pid = None
    try:
        pid = request(sock, "status", timeout=10).get("pid")
        request(sock, "stop", timeout=30)
    except NotRunning:
        print(f"{args.name}: not running")
        return 0
    except KemariError:
        # the daemon may exit before its answer to `stop` is out: judged by its pid below
        pid = pid or _pid_of(args.name)
        if pid is None:
            raise
    end = time.monotonic() + STOP_WAIT_S
    while _alive(pid):
        if time.monotonic() > end:
            raise KemariError(f"{args.name}: daemon pid {pid} still running "
                              f"{STOP_WAIT_S} s after stop")
        time.sleep(0.05)
    return 0


def _pid_of(name: str) -> int | None:
    try:
        return int(paths.pid_path(name).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """True while process `pid` runs (a zombie waiting for its parent counts as gone)."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _save(args: argparse.Namespace) -> int:
    reply = request(paths.socket_path(args.name), "save", path=str(Path(args.file).resolve()))
    print(f"{args.name}: saved {reply['pages']} pages to {reply['path']}")
    return 0


NODE_FLAGS = ("listen", "peer", "fence_peer_handler", "unfence_peer_handler")


def _node_config(args: argparse.Namespace) -> VmConfig:
    """The shared config file, plus this node's addresses: from the command line, else
    from `[replication.nodes]` by this node's name."""
    config = load_config(args.config)
    if args.listen is None:
        listen, peer = node_addresses(config, args.node or os.uname().nodename)
        if listen is not None:
            config = with_overrides(config, listen=f"{listen[0]}:{listen[1]}",
                                    peer=f"{peer[0]}:{peer[1]}" if peer else None)
    return with_overrides(config, **{k: getattr(args, k) for k in NODE_FLAGS})


def _start(args: argparse.Namespace) -> int:
    from .ft.launcher import start
    config = _node_config(args)
    if args.foreground:
        from .ft.daemon import Daemon
        return Daemon(config).serve(args.role)
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in NODE_FLAGS
             if getattr(args, k) is not None]
    if args.node:
        flags.append(f"--node={args.node}")
    status = start(config, Path(args.config).resolve(), args.role, flags)
    print(f"{status['name']}: {status['role']}, {status['state']} (pid {status['pid']})")
    return 0


def _role_change(verb: str):
    def run(args: argparse.Namespace) -> int:
        extra = {"force": True} if getattr(args, "force", False) else {}
        reply = request(paths.socket_path(args.name), verb, timeout=150, **extra)
        if verb == "promote" and reply.get("activation"):
            print(f"{args.name}: {reply['activation']}")
        print(f"{args.name}: {reply['role']}, {reply['state']} (generation {reply['generation']})")
        return 0
    return run


def _peer(args: argparse.Namespace) -> int:
    """Show or change where a primary sends checkpoints (the OCF agent's notify)."""
    sock = paths.socket_path(args.name)
    reply = (request(sock, "peer", address=args.address) if args.address is not None
             else request(sock, "status"))
    print(f"{args.name}: peer {reply.get('replication_peer') or 'none'}")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from .metrics import render, write_textfile
    text = render(_get_status(args.name))
    if args.textfile:
        write_textfile(Path(args.textfile), text)
    else:
        sys.stdout.write(text)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .replication.keys import KeyFileError, keygen
    try:
        keygen(args.file, overwrite=args.force)
    except (KeyFileError, FileExistsError, OSError) as exc:
        raise KemariError(f"keygen {args.file}: {exc}") from exc
    print(f"wrote replication key {args.file} (mode 0600): copy it to both nodes")
    return 0


def _create_disk(args: argparse.Namespace) -> int:
    from .devices.block import create_disk_image
    config = load_config(args.config)
    if config.disk is None:
        raise KemariError(f"{args.config}: no [disk] section, no disk to create")
    create_disk_image(config.disk.path, config.disk.size_mib)
    print(f"created blank disk {config.disk.path} ({config.disk.size_mib} MiB, mode 0600)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main
    return demo_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kemari", description="Fault-tolerant VMs by event tapping.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    r = sub.add_parser("run", help="run a guest unprotected, in the foreground")
    r.add_argument("config", help="VM config file (TOML)")
    r.add_argument("--restore", metavar="FILE", help="resume from a snapshot made by `save`")
    r.set_defaults(func=_run)

    sa = sub.add_parser("start", help="start a VM's daemon (default role: secondary)")
    sa.add_argument("config", help="VM config file (TOML)")
    sa.add_argument("--role", choices=("secondary", "primary"), default="secondary")
    sa.add_argument("--foreground", action="store_true", help="do not detach (debugging)")
    sa.add_argument("--listen", metavar="IP:PORT",
                    help="this node's replication address (overrides the config)")
    sa.add_argument("--peer", metavar="IP:PORT",
                    help="the peer's replication address (overrides the config)")
    sa.add_argument("--node", metavar="NAME",
                    help="this node's name in [replication.nodes] (default: the host name)")
    sa.add_argument("--fence-peer-handler", metavar="CMD",
                    help="run before output leaves unprotected (overrides the config)")
    sa.add_argument("--unfence-peer-handler", metavar="CMD",
                    help="run when the peer is back in sync (overrides the config)")
    sa.set_defaults(func=_start)

    for verb, text in (("promote", "secondary -> primary (failover or cold boot)"),
                       ("demote", "primary -> secondary (final sync + hand-over)")):
        v = sub.add_parser(verb, help=text)
        v.add_argument("name")
        if verb == "promote":
            v.add_argument("--force", action="store_true",
                           help="promote even an inconsistent or outdated node: DATA-LOSING "
                                "(resumes a mixed or older state)")
        v.set_defaults(func=_role_change(verb))

    c = sub.add_parser("create-disk", help="create the config's disk image, blank (never "
                       "overwrites; daemons refuse a missing disk)")
    c.add_argument("config", help="VM config file (TOML)")
    c.set_defaults(func=_create_disk)

    pe = sub.add_parser("peer", help="show or set where the primary sends checkpoints")
    pe.add_argument("name")
    pe.add_argument("address", nargs="?", metavar="IP:PORT",
                    help="the new peer ('' to forget it)")
    pe.set_defaults(func=_peer)

    me = sub.add_parser("metrics", help="Prometheus text format metrics of a VM")
    me.add_argument("name")
    me.add_argument("--textfile", metavar="FILE",
                    help="write to FILE atomically (node_exporter's textfile collector)")
    me.set_defaults(func=_metrics)

    k = sub.add_parser("keygen", help="write a new replication key file (mode 0600)")
    k.add_argument("file")
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=_keygen)

    s = sub.add_parser("status", help="show a VM's state")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", action="store_true",
                   help="keep redrawing (progress bar during a full sync)")
    s.add_argument("--until-synced", action="store_true",
                   help="like --watch, and return once the pair is in sync")
    s.set_defaults(func=_status)

    st = sub.add_parser("stop", help="stop a VM's daemon")
    st.add_argument("name")
    st.set_defaults(func=_stop)

    sv = sub.add_parser("save", help="snapshot a running VM to a file (it keeps running)")
    sv.add_argument("name")
    sv.add_argument("file")
    sv.set_defaults(func=_save)

    d = sub.add_parser("demo", help="boot the kv guest and drive a client session against it")
    d.add_argument("--keep", action="store_true", help="keep the demo's work directory")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s kemari %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except KemariError as exc:
        print(f"kemari: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
