"""The ARM64 lane's Python side (scripts/arm64-lane.sh drives it):

  reference --work DIR          x86 host: build the bundles (torch), run every target, write DIR/x86.npz
  run --work DIR --cpu NAME     arm64 (under QEMU): the same targets through the aarch64 wheels and the
                                cross-built llama.cpp this core can run, write DIR/arm64-NAME.npz
  compare --work DIR            the verdict: every arm64-*.npz against x86.npz; exit 1 on a failure

On arm64 the llama.cpp build is chosen from the CPU's hardware capabilities (getauxval, as a board's
/proc/cpuinfo "asimddp"): the armv8.2-a+dotprod build where the core has dot-product instructions,
else the armv8-a one (a Cortex-A72 dies with SIGILL in the dotprod build).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOTPROD, PORTABLE = "armv8.2-a+dotprod", "armv8-a"
# what the lane must pick per emulated core, and what llama.cpp must repack q4_0 into there
EXPECTED_BUILD = {"cortex-a76": DOTPROD, "cortex-a72": PORTABLE, "max": DOTPROD}
EXPECTED_REPACK = {DOTPROD: "q4_0_4x4"}
HWCAP_ASIMDDP = 1 << 20  # linux/arch/arm64/include/uapi/asm/hwcap.h
AT_HWCAP = 16


def arm_build_for_this_cpu() -> str:
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return DOTPROD if libc.getauxval(AT_HWCAP) & HWCAP_ASIMDDP else PORTABLE


def _chosen(args: argparse.Namespace) -> list:
    from arm64_cases import targets

    every = targets()
    if not args.only:
        return every
    picked = [t for t in every if t.key in args.only]
    if len(picked) != len(args.only):
        raise SystemExit(f"--only: unknown target in {args.only} (known: {', '.join(t.key for t in every)})")
    return picked


def cmd_reference(args: argparse.Namespace) -> None:
    from arm64_bundles import build_all
    from arm64_cases import run_all

    chosen = _chosen(args)
    if not (args.work / "bundles").is_dir():
        build_all(args.work, chosen)
    run_all(args.work / "bundles", args.work / "x86.npz", chosen, {"machine": platform.machine()})


def cmd_run(args: argparse.Namespace) -> None:
    if platform.machine() != "aarch64":
        raise SystemExit(f"run: this is {platform.machine()}, not aarch64 (scripts/arm64-lane.sh runs it)")
    build = args.build or arm_build_for_this_cpu()
    # the repo first (runtime, edge_lora), then the llama_cpp package of the chosen build, then the wheels
    sys.path[1:1] = [str(REPO), str(args.llama / build), str(args.site)]
    from arm64_cases import run_all

    side = {"machine": "aarch64", "cpu": args.cpu, "build": build, "auto_build": not args.build}
    name = args.out or f"arm64-{args.cpu}"
    print(f"arm64 run on {args.cpu} with llama.cpp {build}", flush=True)
    run_all(args.work / "bundles", args.work / f"{name}.npz", _chosen(args), side)


def _repack_problems(side: dict) -> list[str]:
    want = EXPECTED_REPACK.get(side["build"])
    problems = []
    for key, kinds in side["repacked"].items():
        repacks = key.split("/")[2] == "q4_0" and not key.endswith("/norepack")
        if want and repacks and want not in kinds:
            problems.append(f"{side['cpu']} {key}: q4_0 not repacked to {want} (repacked: {kinds or 'none'})")
        if key.endswith("/norepack") and kinds:
            problems.append(f"{side['cpu']} {key}: repacked to {kinds} with use_extra_bufts=False")
    return problems


def cmd_compare(args: argparse.Namespace) -> None:
    import numpy as np
    from arm64_cases import Target
    from arm64_compare import TOLERANCES, compare, format_table, same_side_checks

    x86 = dict(np.load(args.work / "x86.npz"))
    runs = sorted(args.work.glob("arm64-*.npz"))
    if not runs:
        raise SystemExit(f"compare: no arm64-*.npz in {args.work}")
    failed = same_side_checks(x86)
    for path in runs:
        side = json.loads(path.with_suffix(".json").read_text())
        arm = dict(np.load(path))
        ran = {Target(**t).key for t in side["targets"]}  # a run with --only answers for its targets
        verdict = compare(arm, {k: v for k, v in x86.items() if k.rsplit("/", 2)[0] in ran})
        verdict.problems += same_side_checks(arm) + _repack_problems(side)
        want = EXPECTED_BUILD.get(side["cpu"])
        if side["auto_build"] and want and side["build"] != want:
            verdict.problems.append(f"{side['cpu']}: picked llama.cpp {side['build']}, expected {want}")
        worst = ", ".join(
            f"{k} {v:.2g}"
            for k, v in sorted(verdict.by_class().items(), key=lambda kv: list(TOLERANCES).index(kv[0]))
        )
        repacked = sorted({k for kinds in side["repacked"].values() for k in kinds})
        print(
            f"{path.stem}: llama.cpp {side['build']}, {len(verdict.rows)} comparisons, "
            f"repacked {repacked or 'none'}, {side['seconds']} s; worst per class: {worst}"
        )
        if args.verbose:
            print(format_table(verdict))
        for line in verdict.failures():
            print(f"  FAIL {line}")
        failed += [f"{path.stem}: {line}" for line in verdict.failures()]
    if failed:
        print(f"ARM64 lane FAILED: {len(failed)} results outside their tolerance or checks")
        sys.exit(1)
    print("ARM64 lane passed: every ARM result within its tolerance of x86-64")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arm64_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("reference", "run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, required=True, help="the lane's folder (bundles, results)")
        if name != "compare":
            p.add_argument("--only", nargs="*", help="target keys, e.g. llama/llamacpp/q4_0")
    run = sub.choices["run"]
    run.add_argument("--cpu", required=True, help="the QEMU_CPU this runs under (recorded, checked)")
    run.add_argument("--llama", type=Path, required=True, help="scripts/arm64-llama.sh's folder")
    run.add_argument(
        "--site", type=Path, required=True, help="the aarch64 wheels (scripts/arm64-userland.sh)"
    )
    run.add_argument("--build", choices=(DOTPROD, PORTABLE), help="force a llama.cpp build (default: by CPU)")
    run.add_argument("--out", help="result name (default arm64-CPU)")
    sub.choices["compare"].add_argument("--verbose", action="store_true", help="every row, not only failures")
    args = parser.parse_args(argv)
    {"reference": cmd_reference, "run": cmd_run, "compare": cmd_compare}[args.command](args)


if __name__ == "__main__":
    main()
