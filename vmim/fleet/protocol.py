"""What travels through the broker: names of exchanges and queues, and every message, as
typed values with `encode()` and a strict `decode_*()`. This is the only module that knows
message shapes (the connection itself is vmim.fleet.transport's).

Version history (the "v" of every message; a worker refuses another version, with an error
result the client prints):

1  (1.x) a job was an argv: `{"v": 1, "job_id", "argv": [...], "deadline"}`, parsed again by
   the worker and its child; replies `accepted`, `claimed`, `log`, `result`; lists
   `{"v": 1, "job_id", "lists"}` answered by `here` and `lists`.
2  a job is typed: `{"v": 2, "type": "job", "job_id", "box", "deadline", "client",
   "request": Request.to_dict() without boxes and lists, "options": RunOptions.to_dict()}`,
   read with an allow-list (vmim.fields): unknown fields, wrong types, NUL bytes, non-finite
   or out-of-range numbers, oversized strings, lists or messages are refused. `box` is one
   slot name, or `any-free` — the only box a job on the shared any-free queue may name.
   Replies carry `v` and `host`: `accepted` (box, silence: the seconds of silence after which
   the client may give the job up), `running` (sent while the job runs or waits, every few
   seconds), `log`, `result`; `claimed` is gone (the result names the slot that ran the job).
   A refused message is answered with a `result` of exit 2 when its reply_to is a client's
   reply queue (`vmim.reply.<32 hex>`). Lists: `{"v": 2, "type": "lists", "job_id", "lists"}`.
3  the request may carry `stage` (--stage: restore and insert into the slot's standby disk
   while its domain runs) and the action `swap`; a version 2 worker would refuse the field, so
   the version says it first.
   Later, with no change of shape (still 3): a list request may be answered with `lists` of
   exit 5 (the worker is busy with the lists of other clients) or 7 (the list child timed
   out); a job that reuses the id of another job is answered with a `result` of exit 2; a
   client takes a reply that does not decode, or a document of another shape
   (check_document), for an error (exit 7) instead of ignoring it; a job that did not
   come through the jobs exchange with its queue's routing key (the default exchange reaches any
   queue), or a list request not through vmim.control, is refused (check_route). The
   documents of `result` and `lists` are read in the shape declared here (RESULT_DOC,
   LISTS_DOC and the rows below them: unknown fields and wrong types are exit 7 naming the
   host), and a reply's host and box hold no control character.
   Later still (the shapes unchanged, still 3): jobs go through the topic exchange
   vmim.jobs.topic (JOBS) instead of the direct vmim.jobs, so that the broker checks the
   routing key of a host's binding against the host's topic permissions (vmim.fleet.permissions:
   a host's user binds only its own slots' keys and `any`); a worker sets the user_id of its
   replies (RabbitMQ checks it against the connection's user) and a client believes a reply in
   the name of host H only from H's user (vmim.fleet.permissions.vouched). Workers and clients
   of one fleet run one release: a client of this release finds no queue bound for a box on
   vmim.jobs.topic while the workers are older (exit 4, unknown box).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from vmim import fleet
from vmim.errors import EXIT_USAGE, ProtocolError
from vmim.fields import Fields, check_string
from vmim.invocation import BoxRun
from vmim.plan import ANY_FREE, LISTS, REQUEST_FIELDS
from vmim.terminal import CONTROL_CHARACTER, safe

VERSION = 3
MAX_MESSAGE = 64 * 1024  # bytes: a job is a few hundred; anything near this is not a job
#: a worker's reply carries a whole result (lists of many images, -v's log lines): workers are
#: trusted with results, and a result refused for its size would be a job lost
MAX_REPLY = 16 * 1024 * 1024
#: topic, durable: routing key box.<HostName>, or "any". A topic exchange because RabbitMQ checks
#: topic permissions on topic exchanges only; not the direct "vmim.jobs" of earlier releases,
#: which a broker keeps as it was declared (redeclared as a topic: PRECONDITION_FAILED)
JOBS = "vmim.jobs.topic"
JOBS_TYPE = "topic"
CONTROL = "vmim.control"  # fanout: fleet lists
ANY_QUEUE = "vmim.any"
ANY_KEY = "any"
ENV_BROKER = fleet.ENV_BROKER
#: the pid of the worker that started a child: the child runs only while that is its parent
ENV_WORKER = "VMIM_WORKER_PID"
HEARTBEAT = 10  # seconds; the broker drops a silent peer after about twice this

def box_key(box: str) -> str:
    return f"box.{box}"


def routable(box: str) -> bool:
    """Whether jobs for `box` can be routed to it alone: on a topic exchange a word `*` or
    `#` of a binding key (words: between dots) matches other keys, so a slot whose name has
    one would get the jobs of other boxes."""
    return not any(word in ("*", "#") for word in box.split("."))


def box_queue(host: str, box: str) -> str:
    """A queue per slot, named by host first so that a host's user can be limited to
    `^vmim\\.host\\.<host>\\.` (docs/fleet.md). One name for one (host, slot) pair: the host
    name holds no word `box` after its first (host_name_problem), so the first `.box.` after
    `vmim.host.` ends it — host `web` with slot `a.box.b` and host `web.box.a` with slot `b`
    would otherwise share a queue, and each host's user could read the other's jobs."""
    return f"vmim.host.{host}.box.{box}"


def host_name_problem(host: str) -> Optional[str]:
    """Why `host` cannot name a host of the fleet (None: it can): its queue names must not
    be another host's (box_queue), and it is the name of its broker user."""
    if not host or len(host) > MAX_NAME or CONTROL_CHARACTER.search(host):
        return f"a host name of 1 to {MAX_NAME} characters without controls"
    if "box" in host.split(".")[1:]:
        return ("a word 'box' after the first of a host name makes its queue names another "
                "host's (host 'web.box.a', slot 'b' and host 'web', slot 'a.box.b'): name the "
                "host otherwise (--host-name)")
    return None


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and re.fullmatch(r"[0-9a-f]{32}", job_id) is not None


#: what of a Request a job carries: one box is the job's own field; lists are not jobs
JOB_REQUEST_FIELDS = tuple(f for f in REQUEST_FIELDS if f not in ("boxes", "lists"))
JOB_FIELDS = ("v", "type", "job_id", "box", "deadline", "client", "request", "options")
REPLY_TYPES = ("accepted", "running", "log", "result", "here", "lists")
REPLY_TO = re.compile(r"vmim\.reply\.[0-9a-f]{32}")
MAX_NAME = 255  # a box or host name


class VersionError(ProtocolError):
    """A message of a protocol version this side does not speak."""


def usable_reply_to(value: Any) -> Optional[str]:
    """The reply queue of a message when it is a client's (vmim.reply.<32 hex>), else None:
    a job cannot make a worker publish into any other queue."""
    return value if isinstance(value, str) and REPLY_TO.fullmatch(value) else None


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"the message holds {name}, which is not a number")


def _loads(body: Any, what: str, limit: int = MAX_MESSAGE) -> Dict[str, Any]:
    """A message body as a JSON object, refused before parsing when it is over limit."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} is not a message body")
    if len(body) > limit:
        raise ProtocolError(f"{what} is {len(body)} bytes, more than the {limit} a "
                            "message may have")
    try:
        data = json.loads(bytes(body).decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"{what} is not JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} is not a JSON object ({type(data).__name__})")
    if data.get("v") != VERSION:
        v = data.get("v")
        raise VersionError(f"{what} is of protocol version {safe(str(v)[:20]) if v is not None else '(none)'}"
                           f"; this worker speaks version {VERSION}: use a client of the "
                           "same vmimagemanager release as the workers")
    return data


def _encode(body: Dict[str, Any]) -> bytes:
    return json.dumps(dict(body, v=VERSION), sort_keys=True, allow_nan=False).encode()


@dataclass(frozen=True)
class Job:
    """A box run for one box: a slot's name (routed to its queue), or ANY_FREE (the shared
    queue; the worker that takes it picks one of its free slots)."""

    job_id: str
    box: str
    deadline: float  # epoch seconds: until then the client waits for a worker to take it
    run: BoxRun
    client: str = ""

    def encode(self) -> bytes:
        run = self.run.to_dict(JOB_REQUEST_FIELDS)
        return _encode({"type": "job", "job_id": self.job_id, "box": self.box,
                        "deadline": self.deadline, "client": self.client,
                        "request": run["request"], "options": run["options"]})


def decode_job(body: Any, queue: str, route: Optional[Dict[str, Any]] = None) -> Job:
    """A job as a worker accepts it from the queue of box `queue` (ANY_FREE: the shared
    queue), or ProtocolError (VersionError) saying why not. Its box must be the queue's: a
    job on the shared queue is an any-free job, a job on a slot's queue is for that slot.
    `route`: the delivery's exchange and routing key (kombu's delivery_info), check_route()'s."""
    if route is not None:
        check_route(route, queue)
    data = _loads(body, "the job")
    f = Fields(data, "the job", JOB_FIELDS)
    f.string("type", required=True, choices=("job",))
    job_id = f.string("job_id", required=True, max_len=64)
    if not valid_job_id(job_id):
        raise ProtocolError("the job's job_id is not 32 hexadecimal digits")
    box = f.string("box", required=True, max_len=MAX_NAME)
    if box != queue and queue == ANY_FREE:
        raise ProtocolError(f"a job on the shared queue {ANY_QUEUE} is an {ANY_FREE} job; "
                            f"this one names box '{safe(box[:80])}'")
    if box != queue:
        raise ProtocolError(f"a job for box '{safe(box[:80])}' came on the queue of box '{queue}'")
    run = BoxRun.from_dict({"request": f.object("request"), "options": f.object("options")},
                           JOB_REQUEST_FIELDS, "the job")
    if not run.request.actions and not run.options.print_xml:
        raise ProtocolError("the job asks for no action")
    problem = run.request.combination_problem((box,))
    if problem:
        raise ProtocolError(f"the job: {problem}")
    return Job(job_id, box, f.number("deadline", low=0, high=1e11), run,
               f.string("client", "", max_len=MAX_NAME))


def check_route(delivery_info: Dict[str, Any], queue: str) -> None:
    """A job came through JOBS with the routing key of its queue (`queue`: a box, or ANY_FREE),
    or ProtocolError. The broker sets the exchange a message was published to, and
    checks a publish against its exchange only: through the default exchange (amq.default,
    which a host's user may write to answer its clients) any user reaches any queue by name;
    only clients may write on JOBS."""
    exchange, key = delivery_info.get("exchange"), delivery_info.get("routing_key")
    want = ANY_KEY if queue == ANY_FREE else box_key(queue)
    if exchange != JOBS or key != want:
        raise ProtocolError(f"a job is taken only from exchange {JOBS} with routing key "
                            f"'{want}'; this one came from exchange '{safe(str(exchange)[:80])}' "
                            f"with routing key '{safe(str(key)[:80])}'")


def check_list_route(delivery_info: Dict[str, Any]) -> None:
    """A list request came through the vmim.control fanout (see check_route), or
    ProtocolError."""
    exchange = delivery_info.get("exchange")
    if exchange != CONTROL:
        raise ProtocolError(f"a list request is taken only from exchange {CONTROL}; this one "
                            f"came from exchange '{safe(str(exchange)[:80])}'")


@dataclass(frozen=True)
class ListRequest:
    job_id: str
    lists: Tuple[str, ...]

    def encode(self) -> bytes:
        return _encode({"type": "lists", "job_id": self.job_id, "lists": list(self.lists)})


def decode_list_request(body: Any) -> ListRequest:
    f = Fields(_loads(body, "the list request"), "the list request",
               ("v", "type", "job_id", "lists"))
    f.string("type", required=True, choices=("lists",))
    job_id = f.string("job_id", required=True, max_len=64)
    if not valid_job_id(job_id):
        raise ProtocolError("the list request's job_id is not 32 hexadecimal digits")
    lists = tuple(dict.fromkeys(f.strings("lists", choices=LISTS)))
    if not lists:
        raise ProtocolError("the list request asks for no list")
    return ListRequest(job_id, lists)


@dataclass(frozen=True)
class Reply:
    """What a worker sends to a client's reply queue (type: one of REPLY_TYPES)."""

    type: str
    host: str
    box: str = ""
    line: str = ""  # log
    exit_code: int = 0  # result, lists
    doc: Dict[str, Any] = field(default_factory=dict)  # result, lists: the JSON document
    stderr: Tuple[str, ...] = ()  # result, lists: the command's stderr lines
    silence: float = 0.0  # accepted: give the job up after that long without word

    def encode(self) -> bytes:
        body: Dict[str, Any] = {"type": self.type, "host": self.host}
        if self.type in ("accepted", "running", "result"):
            body["box"] = self.box
        if self.type == "accepted":
            body["silence"] = self.silence
        if self.type == "log":
            body["line"] = self.line
        if self.type in ("result", "lists"):
            body.update(exit_code=self.exit_code, doc=self.doc, stderr=list(self.stderr))
        return _encode(body)

    def as_dict(self) -> Dict[str, Any]:
        """As the journal keeps a result."""
        return json.loads(self.encode())


def decode_reply(body: Any) -> Reply:
    """A worker's reply, as a client reads it (workers are trusted with results, not with
    the shape of messages: a malformed one is a ProtocolError, exit 7 at the client when it
    answers what the client asked). The document of a result or of lists is read in its
    declared shape (check_document): what the client prints is then what it expects."""
    f = Fields(_loads(body, "the reply", MAX_REPLY), "the reply",
               ("v", "type", "host", "box", "line", "exit_code", "doc", "stderr", "silence"))
    kind = f.string("type", required=True, choices=REPLY_TYPES)
    stderr = tuple(check_string(x, "the reply: stderr", 1 << 20) for x in f.items("stderr", 1 << 16))
    reply = Reply(kind, _name(f, "host"), _name(f, "box"), f.string("line", "", max_len=1 << 20),
                  f.integer("exit_code", 0, low=0, high=255), f.object("doc"), stderr,
                  f.number("silence", low=0, high=1e7, required=False))
    if kind in ("result", "lists"):
        check_document(kind, reply.doc, reply.host)
    return reply


def reply_host(body: Any) -> Optional[str]:
    """The host a reply that decode_reply() refuses names, when it names one it may be (a
    name without controls): whose malformed answer it is, if that host's user sent it."""
    try:
        doc = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None
    host = doc.get("host") if isinstance(doc, dict) else None
    if not isinstance(host, str) or not host or len(host) > MAX_NAME or \
            CONTROL_CHARACTER.search(host):
        return None
    return host


def _name(f: Fields, key: str) -> str:
    """A host's or a box's name in a reply: printed as it is, it holds no control."""
    name = f.string(key, "", max_len=MAX_NAME)
    if CONTROL_CHARACTER.search(name):
        raise ProtocolError(f"the reply: {key} holds a control character")
    return name


TEXT = 1 << 20  # characters of a free text field (a message, a command line, XML)
MAX_ROWS = 1 << 16  # rows of a list, names of a list field
#: the documents inside `result` and `lists` replies (the --json of a worker's child) as the
#: client reads them: the fields of each object; others are refused, as in messages
RESULT_DOC = ("version", "exit_code", "error", "results", "plan", "expected_exit_code", "xml",
              "claimed", "host")
LISTS_DOC = ("version", "exit_code", "error", "host", *LISTS)
ERROR = ("message", "exit_code", "type", "problems")
PLAN = ("steps", "expected_exit_code", "expected_error")  # vmim.plan.Plan.as_dict()
STEP = ("step", "description", "implicit", "disk")
BOX_ROW = ("name", "in_config", "section", "domain", "store_type", "disk", "disk_missing",
           "definition_drift", "mount", "mounted", "locked", "base", "incomplete", "standby",
           "staged")  # vmim.listing.BoxRow.as_dict()
DOMAIN = ("defined", "state", "persistent")
HOLDER = ("pid", "command")  # vmim.lock.Holder.as_dict()
MARK = ("box", "disk", "image", "pid", "started", "error")  # vmim.incomplete's mark
STAGED = ("image", "started", "finished", "state", "skip")  # vmim.standby.Staged.as_dict()
ENTRY_ROW = ("name", "directory", "path", "format", "size", "mtime", "base_of")  # store.Entry
LOCKED_ROW = ("name", *HOLDER)
PID = 1 << 32


def check_document(kind: str, doc: Dict[str, Any], host: str) -> None:
    """The document of a `result` or `lists` reply from host in its declared shape, or
    ProtocolError naming the host and the field."""
    where = f"the {'lists' if kind == 'lists' else 'result'} from host {host}"
    f = Fields(doc, where, LISTS_DOC if kind == "lists" else RESULT_DOC)
    f.string("version", max_len=MAX_NAME)
    f.string("host", max_len=MAX_NAME)
    f.integer("exit_code", 0, low=0, high=255)
    error = f.fields("error", ERROR)
    if error is not None:
        error.string("message", max_len=TEXT)
        error.integer("exit_code", 0, low=0, high=255)
        error.string("type", max_len=MAX_NAME)
        error.strings("problems", max_items=MAX_ROWS, max_len=TEXT)
    if kind == "lists":
        _check_lists(f)
        return
    for i, r in enumerate(f.items("results", MAX_ROWS)):  # passed on to --json, not read
        if not isinstance(r, dict):
            raise ProtocolError(f"{where}: results[{i}] is not an object")
    f.integer("expected_exit_code", 0, low=0, high=255)
    f.string("claimed", max_len=MAX_NAME)
    plans = f.object("plan")
    for box in plans:
        plan = Fields(plans[box], f"{where}: plan of {safe(str(box)[:80])}", PLAN)
        for step in plan.rows("steps", STEP, MAX_ROWS):
            step.string("step", max_len=MAX_NAME)
            step.string("description", max_len=TEXT)
            step.boolean("implicit")
            step.string("disk", max_len=MAX_NAME)
        plan.integer("expected_exit_code", 0, low=0, high=255)
        plan.string("expected_error", max_len=TEXT)
    xml = f.object("xml")
    for box in xml:
        check_string(xml[box], f"{where}: xml of {safe(str(box)[:80])}", TEXT)


def _check_lists(f: Fields) -> None:
    for row in f.rows("boxes", BOX_ROW, MAX_ROWS):
        row.string("name", required=True, max_len=MAX_NAME)
        for key in ("section", "store_type", "disk", "mount", "base", "standby"):
            row.string(key, nullable=True)
        for key in ("in_config", "disk_missing", "mounted"):
            row.boolean(key)
        row.strings("definition_drift", max_items=MAX_ROWS)
        domain = row.fields("domain", DOMAIN)
        if domain is not None:
            domain.boolean("defined")
            domain.string("state", max_len=MAX_NAME)
            domain.boolean("persistent", nullable=True)
        locked = row.fields("locked", HOLDER, nullable=True)
        if locked is not None:
            locked.integer("pid", None, low=0, high=PID)
            locked.string("command", max_len=TEXT)
        mark = row.fields("incomplete", MARK, nullable=True)
        if mark is not None:
            for key in ("box", "disk", "image", "started", "error"):
                mark.string(key, nullable=True, max_len=TEXT)
            mark.integer("pid", None, low=0, high=PID, nullable=True)
        staged = row.fields("staged", STAGED, nullable=True)
        if staged is not None:
            for key in STAGED:
                staged.string(key, nullable=True, max_len=TEXT)
    for what in ("images", "inserts"):
        for row in f.rows(what, ENTRY_ROW, MAX_ROWS):
            row.string("name", required=True, max_len=MAX_NAME)
            for key in ("directory", "path", "format", "mtime"):
                row.string(key)
            row.integer("size", 0, low=0, high=1 << 63)
            row.strings("base_of", max_items=MAX_ROWS)
    f.strings("free", max_items=MAX_ROWS, max_len=MAX_NAME)
    for row in f.rows("locked", LOCKED_ROW, MAX_ROWS):
        row.string("name", required=True, max_len=MAX_NAME)
        row.integer("pid", None, low=0, high=PID)
        row.string("command", max_len=TEXT)


def decode_journal_reply(data: Any, host: str) -> Reply:
    """A result as the journal keeps it (written by this worker: of this version or 1's); an
    entry that does not read is an error result."""
    try:
        if not isinstance(data, dict):
            raise ProtocolError("not an object")
        return decode_reply(json.dumps(dict(data, v=VERSION)))
    except ProtocolError as exc:
        return error_result(f"the job's journal entry is unreadable: {exc}", host, 1)


def journal_request(box: str, run: BoxRun) -> Any:
    """What the journal keeps of a job's request (its box as the client named it: a slot or
    ANY_FREE, and its run), as it reads back from JSON: equal for a redelivery of the job."""
    return json.loads(json.dumps({"box": box, "run": run.to_dict(JOB_REQUEST_FIELDS)}))


def error_result(message: str, host: str, code: int = EXIT_USAGE, box: str = "") -> Reply:
    """A result for a job that did not run: the message as the local command prints it."""
    from vmim.output import PROG

    return Reply("result", host, box=box, exit_code=code,
                 stderr=(f"{PROG}: error: {message}\n",),
                 doc={"error": {"message": message, "exit_code": code}})


def child_command(config: str) -> list:
    """The worker's child for one run (vmim.fleet.child): the BoxRun comes on its stdin."""
    import sys

    return [sys.executable, "-m", "vmim.fleet.child", "--config", config]


def child_env() -> Dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop(ENV_BROKER, None)
    env[ENV_WORKER] = str(os.getpid())
    return env
