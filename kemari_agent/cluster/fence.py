"""`kemari-fence-peer` / `kemari-unfence-peer`: the handlers a primary runs before
output leaves unprotected and once its peer is back in sync (as DRBD's
crm-fence-peer.9.sh / crm-unfence-peer.9.sh do).

Fencing adds a location constraint to the CIB that forbids the Promoted role
of the VM's promotable clone on every node but this one:

    <rsc_location id="kemari-fence-CLONE" rsc="CLONE">
      <rule role="Promoted" score="-INFINITY"> #uname ne THIS-NODE </rule>
    </rsc_location>

so the peer, whose copy the guest has now run past, can never be promoted
ahead of this node. Unfencing deletes it. Both go through `cibadmin`, so they
also work on a CIB file (`CIB_file=...`), and both are idempotent.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

from ..errors import KemariError
from . import tools

CLONE_TAGS = ("clone", "master")


def clone_of(resource: str) -> str:
    """The promotable clone holding primitive `resource` (its own id if in none)."""
    primitive = resource.split(":")[0]     # OCF_RESOURCE_INSTANCE carries ":N" in clones
    root = ET.fromstring(tools.run(["cibadmin", "--query", "--scope", "resources"]))
    for tag in CLONE_TAGS:
        for clone in root.iter(tag):
            if clone.get("id") == primitive or any(
                    p.get("id") == primitive for p in clone.iter("primitive")):
                return clone.get("id")
    return primitive


def constraint_id(clone: str) -> str:
    return f"kemari-fence-{clone}"


def constraint_xml(clone: str, node: str) -> str:
    cid = constraint_id(clone)
    return (f"<rsc_location id={quoteattr(cid)} rsc={quoteattr(clone)}>"
            f"<rule id={quoteattr(cid + '-rule')} role=\"Promoted\" score=\"-INFINITY\">"
            f"<expression id={quoteattr(cid + '-expr')} attribute=\"#uname\" "
            f"operation=\"ne\" value={quoteattr(node)}/></rule></rsc_location>")


def fenced_for(clone: str) -> str | None:
    """The node a fence constraint keeps the Promoted role on, or None when unfenced."""
    out = tools.run(["cibadmin", "--query", "--scope", "constraints"])
    for loc in ET.fromstring(out).iter("rsc_location"):
        if loc.get("id") == constraint_id(clone):
            expr = loc.find("rule/expression")
            return expr.get("value") if expr is not None else ""
    return None


def fence(clone: str, node: str) -> None:
    """Forbid the Promoted role of `clone` on every node but `node` (create or update)."""
    tools.run(["cibadmin", "--modify", "--allow-create", "--scope", "constraints",
               "--xml-text", constraint_xml(clone, node)])


def unfence(clone: str) -> None:
    if fenced_for(clone) is not None:
        tools.run(["cibadmin", "--delete", "--scope", "constraints",
                   "--xml-text", f"<rsc_location id={quoteattr(constraint_id(clone))}/>"])


def _args(prog: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--resource", default=os.environ.get("OCF_RESOURCE_INSTANCE"),
                   help="the kemari primitive or its clone (default: $OCF_RESOURCE_INSTANCE)")
    p.add_argument("--node", help="this node's name (default: crm_node -n)")
    args = p.parse_args(argv)
    if not args.resource:
        p.error("--resource is required (or OCF_RESOURCE_INSTANCE)")
    return args


def _report(prog: str, action) -> int:
    try:
        message = action()
    except KemariError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(f"{prog}: {message}")
    return 0


def fence_main(argv: list[str] | None = None) -> int:
    args = _args("kemari-fence-peer", argv)

    def act() -> str:
        clone, node = clone_of(args.resource), args.node or tools.local_node()
        fence(clone, node)
        return f"{clone}: Promoted role allowed only on {node} ({constraint_id(clone)})"
    return _report("kemari-fence-peer", act)


def unfence_main(argv: list[str] | None = None) -> int:
    args = _args("kemari-unfence-peer", argv)

    def act() -> str:
        clone = clone_of(args.resource)
        unfence(clone)
        return f"{clone}: fence constraint {constraint_id(clone)} removed"
    return _report("kemari-unfence-peer", act)
