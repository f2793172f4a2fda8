"""What one command does once its arguments are valid: load the config, reach libvirt, print
the plans (--dry-run) or run the boxes, print the lists. cli.py parses and reports."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import replace
from typing import Any, Dict, List, Optional, TextIO

from vmim import fleet, signals
from vmim.config import Config
from vmim.domain import Hypervisor
from vmim.errors import (
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ConfigError,
    Interrupted,
    StateError,
    UsageError,
)
from vmim.invocation import Invocation
from vmim.output import PROG, print_lists, render_plans
from vmim.plan import ANY_FREE, DISK_ACTIONS, Plan, Request, Step, Verdict
from vmim.recorder import BoxResult
from vmim.steps import Options
from vmim.terminal import safe

log = logging.getLogger("vmim")


def run_command(inv: Invocation, doc: Dict[str, Any], out: TextIO) -> int:
    from vmim import config as config_mod
    from vmim import process

    process.reset_cancel()
    req, opts = inv.request, inv.options
    if inv.lvm:
        log.warning("--lvm is ignored: set store_type = \"lvm\" for the slot in the config")
    for note in inv.notes:
        log.warning("%s", note)

    cfg: Optional[Config] = None
    problem: Optional[ConfigError] = None
    try:
        cfg = config_mod.load(inv.config)  # once: its warnings are said once
    except ConfigError as exc:  # a client with --broker needs no config of its own
        problem = exc
    if not inv.local and (req.boxes or req.lists) and fleet.broker_url(inv.broker, cfg):
        from vmim.fleet import client

        broker = client.broker_of(inv, cfg)
        if broker is not None:  # the fleet: the owning host's worker runs it
            return client.run(inv, broker, doc, out)
    if problem is not None or cfg is None:
        raise problem or ConfigError("no configuration")
    if inv.print_config is not None:
        text = config_mod.render_config(cfg)
        if inv.print_config == "-":
            if not opts.json:
                out.write(text)
            else:
                doc["config"] = text
        elif opts.dry_run:
            log.info("dry run: would write the configuration to %s", inv.print_config)
        else:
            write_file(inv.print_config, text)

    disk_actions = [a for a in req.actions if a in DISK_ACTIONS]
    if disk_actions:
        from vmim.steps import require_root

        require_root(", ".join(disk_actions))
    hv = None
    code = EXIT_OK
    try:
        if req.boxes or {"boxes", "free"} & set(req.lists):
            from vmim import domain

            hv = domain.connect(inv.connect or cfg.uri)
        if req.boxes:
            assert hv is not None
            check_boxes(req, cfg, hv)
            if opts.print_xml:
                print_xml(req, cfg, hv, opts.json, doc, out)
            if req.actions and opts.dry_run:
                code = print_plans(req, cfg, hv, opts.lock_wait, opts.json, doc, out,
                                   timeout=opts.timeout)
            elif req.actions:
                from vmim import progress

                progress.enabled = (sys.stderr.isatty() and not opts.json and not opts.quiet
                                    and (len(req.boxes) == 1 or opts.jobs == 1))
                options = Options(lock_wait=opts.lock_wait, timeout=opts.timeout, core=opts.core)
                code = run_boxes(req, cfg, hv, options, doc, out, opts.json, opts.quiet > 0,
                                 opts.jobs)
        print_lists(req, cfg, hv, opts.json, doc, out)
    finally:
        if hv is not None:
            hv.close()
    return code


def plans_for(req: Request, cfg: Config, hv: Hypervisor, lock_wait: int,
              timeout: Optional[int] = None) -> List[Plan]:
    """The plan of every box, from the state observed now (the same observation and planning
    as the run; the run does them again under each slot's lock)."""
    from vmim import listing

    boxes = req.boxes
    if tuple(boxes) == (ANY_FREE,):
        free = [r.name for r in listing.boxes(cfg, hv.domains()) if r.is_free]
        if not free:
            return [Plan(ANY_FREE, (Step("claim", "claim a free slot"),),
                         Verdict(EXIT_LOCKED, f"no free slot: all {len(cfg.slots)} slots of "
                                 f"{cfg.path} are running, mounted or locked; try again "
                                 "later"))]
        boxes = tuple(free[:1])
    return [plan_of(req, cfg, hv, box, lock_wait, timeout) for box in boxes]


def plan_of(req: Request, cfg: Config, hv: Hypervisor, box: str, lock_wait: int,
            timeout: Optional[int] = None) -> Plan:
    """One box's plan, on the disk its domain boots (vmim.standby): what the run does; a
    --timeout replaces the slot's in the shutdown it describes, as in the run."""
    from vmim import standby
    from vmim.observe import observe
    from vmim.plan import Observed, plan_box, plan_staged

    def seen(b: str, r: Request) -> Observed:
        observed = observe(cfg, hv, b, r)
        return observed if timeout is None else replace(observed, timeout=timeout)

    cfg = standby.resolve(cfg, hv, box)
    if req.stage:
        spare = standby.standby_name(box)
        return plan_staged(req, box, seen(box, req.swapping()),
                           seen(spare, req.staging())
                           if cfg.slot(spare) else None, lock_wait=lock_wait)
    return plan_box(req, box, seen(box, req), lock_wait=lock_wait)


def print_plans(req: Request, cfg: Config, hv: Hypervisor, lock_wait: int, as_json: bool,
                doc: Dict[str, Any], out: TextIO, timeout: Optional[int] = None) -> int:
    """--dry-run: each box's plan; exits with the code the run would end with when the plan
    knows it (the highest of the boxes'), else 0. Reads state, changes nothing."""
    plans = plans_for(req, cfg, hv, lock_wait, timeout)
    code = max(p.expected_exit for p in plans)
    if as_json:
        doc["plan"] = {p.box: p.as_dict() for p in plans}
        doc["expected_exit_code"] = code
        return code
    render_plans(plans, code, out)
    return code


def print_xml(req: Request, cfg: Config, hv: Hypervisor, as_json: bool, doc: Dict[str, Any],
              out: TextIO) -> None:
    from vmim import definition, standby

    xml: Dict[str, str] = {}
    for box in req.boxes:
        slot = standby.resolve(cfg, hv, box).slot(box)  # on the disk its domain boots
        if slot is None:
            what = "is a libvirt domain with" if hv.domain(box) is not None else "has"
            raise StateError(f"box '{box}' {what} no slot in {cfg.path}: there is no config to "
                             "build its domain from")
        if hv.domain(box) is not None:
            log.info("box %s is already defined in libvirt; -u would not redefine it", box)
        xml[box] = definition.domain_xml(slot)
        warning = definition.boot_warning(slot)
        if warning:
            log.warning("%s", warning)
    if as_json:
        doc["xml"] = xml
    else:
        out.writelines(xml.values())


def run_parallel(req: Request, cfg: Config, hv: Hypervisor, options: Options, jobs: int,
                 doc: Dict[str, Any]) -> List[BoxResult]:
    """Boxes in worker threads, each under its own lock. A signal stops every box's current
    command; each box then cleans up as after a failure, and the run ends with the signal."""
    from concurrent.futures import ThreadPoolExecutor

    from vmim import process
    from vmim.runner import run_box

    with ThreadPoolExecutor(max_workers=min(jobs, len(req.boxes))) as pool:
        futures = [pool.submit(run_box, cfg, box, hv, req, options) for box in req.boxes]
        try:
            with signals.waiting():
                return [f.result() for f in futures]
        except Interrupted as exc:
            process.cancel_all(exc.signum)
            results = [f.result() for f in futures]
            doc["results"] = [r.as_dict() for r in results]
            raise


def run_boxes(req: Request, cfg: Config, hv: Hypervisor, options: Options,
              doc: Dict[str, Any], out: TextIO, as_json: bool, quiet: bool,
              jobs: int = 1) -> int:
    from vmim.runner import claim_free_slot, run_box

    if req.boxes == (ANY_FREE,):
        box, held = claim_free_slot(cfg, hv)
        doc["claimed"] = box
        if not as_json:
            out.write(safe(box) + "\n")
            out.flush()
        req = replace(req, boxes=(box,))
        with held:
            results = [run_box(cfg, box, hv, req, options, locked=True)]
    elif jobs > 1 and len(req.boxes) > 1:
        results = run_parallel(req, cfg, hv, options, jobs, doc)
    else:
        results = []
        for box in req.boxes:
            results.append(run_box(cfg, box, hv, req, options))
            if results[-1].exit_code in (EXIT_SIGINT, EXIT_SIGTERM):
                break  # a signal stops the command: the boxes after this one are not touched
    doc["results"] = [r.as_dict() for r in results]
    for r in results:
        if r.error is not None:
            failed = next((s.step for s in r.steps if s.status == "failed"), None)
            where = f"box {r.box}: {failed} failed" if failed else f"box {r.box}"
            tail = "; the domain was not started" if "up" in req.actions else ""
            message = str(r.error)
            own = f"box '{r.box}': "
            if message.startswith(own):  # said once: "box web1: ...", not "box web1: box 'web1': ..."
                message = message[len(own):]
            sys.stderr.write(f"{PROG}: error: {where}: {message}{tail}\n")
    if len(results) > 1 and not quiet:
        for r in results:
            took = sum(s.seconds for s in r.steps)
            state = "ok" if r.error is None else f"FAILED (exit {r.exit_code})"
            n = len(r.steps)
            sys.stderr.write(f"{PROG}: box {r.box}: {state}, {n} step{'' if n == 1 else 's'}, "
                             f"{took:.1f} s\n")
    codes = [r.exit_code for r in results if r.exit_code]
    return max(codes) if codes else EXIT_OK


def write_file(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"cannot write '{path}': {exc.strerror}") from None


def check_boxes(req: Request, cfg: Config, hv: Hypervisor) -> None:
    if ANY_FREE in req.boxes:
        if len(req.boxes) > 1:
            raise UsageError(f"-b {ANY_FREE} claims one slot: give no other -b")
        return
    known = set(cfg.slot_names) | set(hv.domains())
    unknown = [b for b in req.boxes if b not in known]
    if unknown:
        names = ", ".join(f"'{safe(b)}'" for b in unknown)
        listing = ", ".join(sorted(known)) or "(none: the config has no slots and libvirt no domains)"
        close = [c for b in unknown for c in difflib.get_close_matches(b, sorted(known), n=1)]
        hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
        raise StateError(f"unknown box {names}: no slot in {cfg.path} and no domain in libvirt "
                         f"at {hv.uri}; {hint}known boxes: {listing}")


