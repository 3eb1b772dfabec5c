"""The Sparkplug B protobuf classes, built at import from ``sparkplug_b.proto``.

Why not protoc's generated ``sparkplug_b_pb2.py``: its schema is an opaque
serialized blob, and since protobuf 5.26 generated code checks that the
runtime has the same major version as the protoc that wrote it, so every
protobuf major release would need it regenerated (and protoc, or
grpcio-tools, installed to do it). The .proto uses a small part of proto2
(messages, nested messages, optional/repeated scalar and message fields,
oneofs, extension ranges); this module reads exactly that part into a
``FileDescriptorProto`` and lets the protobuf runtime (upb) build the
classes, with the same wire format and speed as generated code. Anything
outside that part is refused with the line it is on, so an edit to the
.proto cannot be misread silently.

    Payload = message_class("Payload"); p = Payload(); p.ParseFromString(b)
"""
from __future__ import annotations

import importlib.resources
import re

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {"double": F.TYPE_DOUBLE, "float": F.TYPE_FLOAT, "int64": F.TYPE_INT64,
           "uint64": F.TYPE_UINT64, "int32": F.TYPE_INT32, "uint32": F.TYPE_UINT32,
           "bool": F.TYPE_BOOL, "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES}
LABELS = {"optional": F.LABEL_OPTIONAL, "repeated": F.LABEL_REPEATED,
          "required": F.LABEL_REQUIRED}
EXTENSION_MAX = 536870912  # exclusive end of "to max" (field numbers go up to 2^29 - 1)

_TOKENS = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|(?P<t>"[^"\n]*"|[A-Za-z_][\w.]*|\d+|[{};=])|(?P<bad>.)',
                     re.S)


class ProtoSyntaxError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, int]]:
    out = []
    for m in _TOKENS.finditer(text):
        if m.group("bad"):
            raise ProtoSyntaxError(f"line {text.count(chr(10), 0, m.start()) + 1}: unexpected "
                                   f"{m.group('bad')!r}")
        if m.group("t"):
            out.append((m.group("t"), text.count("\n", 0, m.start()) + 1))
    return out


class _Reader:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.refs: list[tuple[F, str, str]] = []  # (field, type as written, scope)

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def take(self, expect: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise ProtoSyntaxError(f"unexpected end of file (expected {expect or 'more'})")
        tok, line = self.toks[self.i]
        if expect is not None and tok != expect:
            raise ProtoSyntaxError(f"line {line}: expected {expect!r}, found {tok!r}")
        self.i += 1
        return tok

    def fail(self, what: str):
        tok, line = self.toks[min(self.i, len(self.toks) - 1)]
        raise ProtoSyntaxError(f"line {line}: {what} (at {tok!r}); sparkplug_b.py reads "
                               "messages, fields, oneofs and extension ranges only")

    def file(self) -> descriptor_pb2.FileDescriptorProto:
        fd = descriptor_pb2.FileDescriptorProto(name="sparkplug_b.proto")
        while self.peek() is not None:
            tok = self.take()
            if tok == "syntax":
                self.take("=")
                fd.syntax = self.take().strip('"')
                if fd.syntax != "proto2":
                    self.fail("only proto2 is read")
                self.take(";")
            elif tok == "package":
                fd.package = self.take()
                self.take(";")
            elif tok == "message":
                self.message(fd.message_type.add(), fd.package)
            else:
                self.i -= 1
                self.fail("expected syntax, package or message")
        return fd

    def message(self, msg: descriptor_pb2.DescriptorProto, scope: str) -> None:
        msg.name = self.take()
        full = f"{scope}.{msg.name}"
        self.take("{")
        while (tok := self.peek()) != "}":
            if tok == "message":
                self.take()
                self.message(msg.nested_type.add(), full)
            elif tok == "oneof":
                self.take()
                index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=self.take())
                self.take("{")
                while self.peek() != "}":
                    self.field(msg, full, F.LABEL_OPTIONAL).oneof_index = index
                self.take("}")
            elif tok == "extensions":
                self.take()
                start = int(self.take())
                self.take("to")
                end = self.take()
                msg.extension_range.add(start=start,
                                        end=EXTENSION_MAX if end == "max" else int(end) + 1)
                self.take(";")
            elif tok in LABELS:
                self.field(msg, full, LABELS[self.take()])
            else:
                self.fail("expected a field, message, oneof or extensions")
        self.take("}")

    def field(self, msg, scope: str, label) -> F:
        typ, name = self.take(), self.take()
        self.take("=")
        f = msg.field.add(name=name, number=int(self.take()), label=label)
        self.take(";")
        if typ in SCALARS:
            f.type = SCALARS[typ]
        else:
            f.type = F.TYPE_MESSAGE
            self.refs.append((f, typ, scope))
        return f


def _resolve(fd: descriptor_pb2.FileDescriptorProto, refs) -> None:
    """Message type names as protobuf scopes them: the innermost enclosing
    scope that has the name wins."""
    known = set()

    def walk(msgs, scope):
        for m in msgs:
            known.add(f"{scope}.{m.name}")
            walk(m.nested_type, f"{scope}.{m.name}")
    walk(fd.message_type, fd.package)
    for f, typ, scope in refs:
        parts = scope.split(".")
        for n in range(len(parts), -1, -1):
            candidate = ".".join(parts[:n] + [typ])
            if candidate in known:
                f.type_name = "." + candidate
                break
        else:
            raise ProtoSyntaxError(f"field {f.name}: unknown type {typ!r}")


def parse(text: str) -> descriptor_pb2.FileDescriptorProto:
    r = _Reader(text)
    fd = r.file()
    _resolve(fd, r.refs)
    return fd


def _load():
    text = importlib.resources.files(__package__).joinpath("sparkplug_b.proto").read_text()
    fd = parse(text)
    # A pool of our own: another copy of Tahu's schema loaded in the same
    # process (it uses the same names) cannot clash with it.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return fd.package, pool


PACKAGE, POOL = _load()


def message_class(name: str):
    """The class of message ``name`` ("Payload", "Payload.Metric", ...)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


Payload = message_class("Payload")
Metric = message_class("Payload.Metric")
