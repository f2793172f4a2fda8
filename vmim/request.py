"""What a command asks for, as a typed value: the Request the command line builds once and a
fleet job carries (to_dict/from_dict), checked as the command line checks it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

from vmim.words import Action, Format, ListKind

#: The fixed per-box pipeline, whatever the order of the flags.
PIPELINE: Tuple[Action, ...] = tuple(Action)
BOX_PLACEHOLDER = "{box}"
#: -b any-free: claim one free slot (under its lock) and act on it
ANY_FREE = "any-free"


@dataclass(frozen=True)
class Transfer:
    """An insert or extract: an archive NAME and a directory inside the guest."""

    name: str
    directory: str


#: what a request may ask for: the formats of store and extract, and the lists
FORMATS: Tuple[Format, ...] = tuple(Format)
LISTS: Tuple[ListKind, ...] = tuple(ListKind)
#: the fields of Request.to_dict(); a fleet job carries them without boxes and lists
REQUEST_FIELDS = ("boxes", "actions", "lists", "store", "restore", "inserts", "extracts",
                  "format", "disk_image", "stage")
#: what a staging (--stage) may do to the standby disk, and what it may do besides
STAGE_ACTIONS = (Action.RESTORE, Action.INSERT)
SWAP_ACTIONS = (Action.KILL, Action.DOWN, Action.REDEFINE, Action.SWAP, Action.UP)


@dataclass(frozen=True)
class Request:
    """What the command line asks for, validated: a value (lists given are kept as tuples)
    that crosses process boundaries as `to_dict()` and comes back with `from_dict()`."""

    boxes: Tuple[str, ...] = ()
    # the words are made the vocabulary's (vmim.words: Action, ListKind, Format), which are
    # str: callers may give plain words
    actions: Tuple[str, ...] = ()  # in PIPELINE order
    lists: Tuple[str, ...] = ()
    store: Optional[str] = None
    restore: Optional[str] = None
    inserts: Tuple[Transfer, ...] = ()
    extracts: Tuple[Transfer, ...] = ()
    format: Optional[str] = None
    disk_image: bool = False  # --disk-image: store/restore the whole disk
    stage: bool = False  # --stage: restore and insert into the standby disk (vmim.standby)

    def __post_init__(self) -> None:
        for name in ("boxes", "inserts", "extracts"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # a word outside the vocabulary is a ValueError here
        object.__setattr__(self, "actions", tuple(Action(a) for a in self.actions))
        object.__setattr__(self, "lists", tuple(ListKind(w) for w in self.lists))
        if self.format is not None:
            object.__setattr__(self, "format", Format(self.format))

    def store_name(self, box: str) -> Optional[str]:
        return self.store.replace(BOX_PLACEHOLDER, box) if self.store is not None else None

    def extract_name(self, name: str, box: str) -> str:
        return name.replace(BOX_PLACEHOLDER, box)

    def to_dict(self, fields: Sequence[str] = REQUEST_FIELDS) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "boxes": list(self.boxes), "actions": list(self.actions), "lists": list(self.lists),
            "store": self.store, "restore": self.restore,
            "inserts": [{"name": t.name, "directory": t.directory} for t in self.inserts],
            "extracts": [{"name": t.name, "directory": t.directory} for t in self.extracts],
            "format": self.format, "disk_image": self.disk_image, "stage": self.stage}
        return {k: v for k, v in d.items() if k in fields}

    @classmethod
    def from_dict(cls, data: Any, fields: Sequence[str] = REQUEST_FIELDS,
                  what: str = "the request") -> Request:
        """The request a dict describes, read strictly (vmim.fields): unknown fields, wrong
        types, unknown actions, lists or formats are a ProtocolError. The actions come back
        in PIPELINE order whatever order they were sent in."""
        from vmim.fields import Fields

        f = Fields(data, what, fields)

        def transfers(key: str) -> Tuple[Transfer, ...]:
            out = []
            for i, item in enumerate(f.items(key)):
                t = Fields(item, f"{what}: {key}[{i}]", ("name", "directory"))
                out.append(Transfer(t.string("name", required=True),
                                    t.string("directory", required=True)))
            return tuple(out)

        actions = set(f.strings("actions", choices=PIPELINE))
        req = cls(boxes=tuple(f.strings("boxes")),
                  actions=tuple(a for a in PIPELINE if a in actions),
                  lists=tuple(dict.fromkeys(f.strings("lists", choices=LISTS))),
                  store=f.string("store", nullable=True),
                  restore=f.string("restore", nullable=True),
                  inserts=transfers("inserts"), extracts=transfers("extracts"),
                  format=f.string("format", nullable=True, choices=FORMATS),
                  disk_image=f.boolean("disk_image"), stage=f.boolean("stage"))
        req.check(what)
        return req

    def check(self, what: str = "the request") -> None:
        """What the command line makes sure of, for a request read from elsewhere (a fleet
        job): each data action has what it works on and nothing else is given; names are
        store names; --disk-image only with -s or -r. A ProtocolError otherwise, before
        anything is touched."""
        from vmim.errors import ProtocolError, UsageError
        from vmim.store import validate_name

        given = {"store": self.store is not None, "restore": self.restore is not None,
                 "insert": bool(self.inserts), "extract": bool(self.extracts)}
        for action, has in given.items():
            if (action in self.actions) != has:
                raise ProtocolError(f"{what}: action {action} and what it works on do not go "
                                    "together")
        problem = self.combination_problem()
        if problem:
            raise ProtocolError(f"{what}: {problem}")
        named = [("image", self.store), ("image", self.restore),
                 *(("insert", t.name) for t in self.inserts),
                 *(("extract", t.name) for t in self.extracts)]
        try:
            for kind, name in named:
                if name is not None:
                    validate_name(name.replace(BOX_PLACEHOLDER, "box"), kind)
        except UsageError as exc:
            raise ProtocolError(f"{what}: {exc}") from None
        if any(not t.directory for t in (*self.inserts, *self.extracts)):
            raise ProtocolError(f"{what}: a directory is empty")

    def combination_problem(self, boxes: Sequence[str] = ()) -> Optional[str]:
        """Why these actions do not go together, or None: one rule for the command line (exit
        2) and a fleet job (refused), whose box comes beside the request (`boxes`)."""
        problem = self.stage_problem()
        if problem:
            return problem
        if self.stage and ANY_FREE in (*self.boxes, *boxes):
            return f"--stage works on a named slot whose domain runs, not on -b {ANY_FREE}"
        if self.disk_image and (self.inserts or self.extracts):
            return "--disk-image stores and restores whole disks: it does not go with -i or -e"
        if self.disk_image and self.store is None and self.restore is None:
            return "--disk-image goes with -s NAME or -r NAME"
        if self.store is not None and self.store == self.restore:
            return (f"-s {self.store} and -r {self.restore} in one command: the store runs "
                    "first and would replace the image that the restore then reads; store "
                    "under another name, or give two commands")
        return None

    def stage_problem(self) -> Optional[str]:
        """Why --stage does not go with this request, or None."""
        if not self.stage:
            return None
        if not set(self.actions) & set(STAGE_ACTIONS):
            return "--stage needs -r NAME (or -i NAME, into what is staged already)"
        other = [a for a in self.actions if a not in STAGE_ACTIONS + SWAP_ACTIONS]
        if other:
            return (f"--stage restores and inserts into the standby disk; {', '.join(other)} "
                    "works on the active disk: run it as a command of its own")
        return None

    def staging(self) -> Request:
        """The part of a --stage request that works on the standby disk (ending released)."""
        return replace(self, actions=tuple(a for a in self.actions if a in STAGE_ACTIONS) +
                       ("release",), stage=False)

    def swapping(self) -> Request:
        """The part of a --stage request that works on the domain: with -u, the swap."""
        actions = {a for a in self.actions if a in SWAP_ACTIONS}
        if "up" in actions:
            actions.add("swap")
        return replace(self, actions=tuple(a for a in PIPELINE if a in actions), restore=None,
                       inserts=(), stage=False, disk_image=False)
