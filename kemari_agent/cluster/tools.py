"""Running Pacemaker's and Corosync's command-line tools."""

from __future__ import annotations

import subprocess

from ..errors import KemariError

TOOL_TIMEOUT_S = 30


class ToolError(KemariError):
    """A cluster tool failed; the message names the command and its error."""

    def __init__(self, argv: list[str], code: int, stderr: str) -> None:
        last = stderr.strip().splitlines()[-1:] or ["(no message)"]
        super().__init__(f"{' '.join(argv)}: exit {code}: {last[0]}")
        self.code = code


def run(argv: list[str], input_text: str | None = None, check: bool = True) -> str:
    """stdout of argv; raises ToolError (check=True) when it exits non-zero."""
    try:
        proc = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise KemariError(f"{argv[0]} is not installed (Pacemaker/Corosync tools)") from exc
    except subprocess.TimeoutExpired as exc:
        raise KemariError(f"{' '.join(argv)}: no answer within {TOOL_TIMEOUT_S} s") from exc
    if check and proc.returncode != 0:
        raise ToolError(argv, proc.returncode, proc.stderr)
    return proc.stdout


def local_node() -> str:
    """This node's name in the cluster (`crm_node -n`)."""
    return run(["crm_node", "-n"]).strip()


def corosync_nodes() -> dict[str, str]:
    """Node name -> ring0 address from the running corosync's nodelist."""
    fields: dict[str, dict[str, str]] = {}
    for line in run(["corosync-cmapctl", "nodelist."]).splitlines():
        # nodelist.node.0.ring0_addr (str) = 10.213.0.11
        key, sep, value = line.partition(" = ")
        parts = key.split(" ")[0].split(".")
        if sep and len(parts) == 4 and parts[1] == "node":
            fields.setdefault(parts[2], {})[parts[3]] = value.strip()
    return {f["name"]: f["ring0_addr"] for f in fields.values()
            if "name" in f and "ring0_addr" in f}
