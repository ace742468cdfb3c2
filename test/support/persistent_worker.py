#!/usr/bin/env python3
"""A Bazel persistent worker for Berth's tests, in Python's standard library only.

Started with --persistent_worker it reads WorkRequests from stdin and writes
WorkResponses to stdout, in the encoding --protocol names (proto: varint
length-delimited messages, encoded by hand below; json: one object per line).
Without it, it is the same tool run once: its @flagfile arguments are read
from the files they name, and the answer goes to stderr.

Start-up options:  --protocol=proto|json  --startup-delay=SECONDS
                   --banner (writes a line to stdout first, as a careless tool would)
Request arguments that change what it does (any other argument is echoed):
  --crash                  exit without answering
  --crash-in-pid=PID       exit without answering when this process is PID
  --garbage                write something that is no WorkResponse, then wait
  --huge=BYTES             answer with an output of BYTES bytes, streamed
  --exit-code=N            answer with exit code N
  --request-id=N           answer with request_id N (whatever the request's)
  --twice                  answer twice
  --split-newline          write a json answer's final newline 50 ms later, in a write of its own
  --sleep=SECONDS          wait before answering
  --stderr=TEXT            write TEXT to stderr (not part of any answer)
  --background             leave a `sleep 3600` running (its pid is in the answer)
  --try-read=PATH, --try-write=PATH   try; the answer says "ok" or the error's name
The answer's output is one JSON line: the process's pid, how many requests it
has answered, its start-up arguments, the request's arguments and its inputs
(path -> digest as sent).
"""

import base64
import json
import os
import subprocess
import sys
import time

STARTED = time.monotonic()


def read_varint(stream):
    shift = 0
    result = 0
    while True:
        byte = stream.read(1)
        if not byte:
            return None if shift == 0 else fail("stdin ended inside a varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def fail(message):
    sys.stderr.write("persistent_worker.py: %s\n" % message)
    sys.stderr.flush()
    os._exit(2)


def fields(data):
    """(field number, wire type, value) of a protobuf message."""
    at = 0
    while at < len(data):
        key, at = varint_at(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint_at(data, at)
        elif wire == 2:
            length, at = varint_at(data, at)
            value, at = data[at:at + length], at + length
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            fail("wire type %d in a WorkRequest" % wire)
        yield number, wire, value


def varint_at(data, at):
    shift = 0
    result = 0
    while True:
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, at
        shift += 7


def decode_request(data):
    request = {"arguments": [], "inputs": [], "requestId": 0}
    for number, _, value in fields(data):
        if number == 1:
            request["arguments"].append(value.decode("utf-8"))
        elif number == 2:
            entry = {"path": "", "digest": ""}
            for n, _, v in fields(value):
                if n == 1:
                    entry["path"] = v.decode("utf-8")
                elif n == 2:
                    entry["digest"] = v.decode("utf-8")
            request["inputs"].append(entry)
        elif number == 3:
            request["requestId"] = value
    return request


def encode_varint(value):
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_response(exit_code, output, request_id):
    body = bytearray()
    if exit_code:
        body += b"\x08" + encode_varint(exit_code)
    text = output.encode("utf-8")
    if text:
        body += b"\x12" + encode_varint(len(text)) + text
    if request_id:
        body += b"\x18" + encode_varint(request_id)
    return encode_varint(len(body)) + bytes(body)


def read_request(protocol):
    if protocol == "json":
        line = sys.stdin.buffer.readline()
        if not line:
            return None
        raw = json.loads(line)
        return {
            "arguments": raw.get("arguments", []),
            "inputs": [
                {"path": i.get("path", ""), "digest": base64.b64decode(i.get("digest", "")).decode()}
                for i in raw.get("inputs", [])
            ],
            "requestId": int(raw.get("requestId", 0)),
        }
    length = read_varint(sys.stdin.buffer)
    if length is None:
        return None
    data = sys.stdin.buffer.read(length)
    if len(data) != length:
        fail("stdin ended inside a WorkRequest")
    return decode_request(data)


def write(data):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def option(arguments, name):
    for argument in arguments:
        if argument.startswith(name + "="):
            return argument[len(name) + 1:]
    return None


def write_huge(protocol, size, request_id):
    """One response whose output is `size` bytes, written 1 MiB at a time (never held whole)."""
    chunk = b"x" * (1024 * 1024)
    if protocol == "json":
        write(b'{"exitCode":0,"output":"')
    else:
        tail = b"\x18" + encode_varint(request_id) if request_id else b""
        length_of_length = len(encode_varint(size))
        write(encode_varint(1 + length_of_length + size + len(tail)) + b"\x12" + encode_varint(size))
    left = size
    while left > 0:
        part = chunk[: min(left, len(chunk))]
        write(part)
        left -= len(part)
    write(b'"}\n' if protocol == "json" else tail)


def answer(protocol, startup, request, count):
    arguments = request["arguments"]
    stderr_text = option(arguments, "--stderr")
    if stderr_text is not None:
        sys.stderr.write(stderr_text + "\n")
        sys.stderr.flush()
    if "--crash" in arguments or option(arguments, "--crash-in-pid") == str(os.getpid()):
        os._exit(3)
    delay = option(arguments, "--sleep")
    if delay is not None:
        time.sleep(float(delay))
    if "--garbage" in arguments:
        write(b"this is not a WorkResponse\n" if protocol == "json" else b"\x05\x0f\x0f\x0f\x0f\x0f")
        time.sleep(3600)
    probes = {}
    for argument in arguments:
        kind, _, path = argument.partition("=")
        if kind in ("--try-read", "--try-write"):
            try:
                if kind == "--try-read":
                    with open(path, "rb") as probed:
                        probed.read(1)
                else:
                    with open(path, "wb") as probed:
                        probed.write(b"written by a persistent worker\n")
                probes[argument] = "ok"
            except OSError as err:
                probes[argument] = type(err).__name__
    children = []
    if "--background" in arguments:
        children.append(subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL).pid)
    huge = option(arguments, "--huge")
    if huge is not None:
        write_huge(protocol, int(huge), request["requestId"])
        return
    output = json.dumps(
        {
            "pid": os.getpid(),
            "children": children,
            "probes": probes,
            "cwd": os.getcwd(),
            "count": count,
            "startup": startup,
            "arguments": arguments,
            "inputs": {i["path"]: i["digest"] for i in request["inputs"]},
        },
        sort_keys=True,
    ) + "\n"
    exit_code = int(option(arguments, "--exit-code") or "0")
    request_id = int(option(arguments, "--request-id") or request["requestId"])
    if protocol == "json":
        response = {"exitCode": exit_code, "output": output}
        if request_id:
            response["requestId"] = request_id
        encoded = (json.dumps(response) + "\n").encode("utf-8")
    else:
        encoded = encode_response(exit_code, output, request_id)
    if "--split-newline" in arguments and encoded.endswith(b"\n"):
        write(encoded[:-1])
        time.sleep(0.05)
        encoded = b"\n"
    write(encoded * (2 if "--twice" in arguments else 1))


def expand(argument):
    """Bazel's expansion of one @flagfile argument: each line an argument, expanded again."""
    if argument.startswith("@") and not argument.startswith("@@"):
        with open(argument[1:], encoding="utf-8") as flagfile:
            return [a for line in flagfile.read().splitlines() for a in expand(line)]
    return [argument]


def main():
    startup = sys.argv[1:]
    protocol = option(startup, "--protocol") or "proto"
    delay = option(startup, "--startup-delay")
    if delay is not None:
        time.sleep(max(0.0, float(delay) - (time.monotonic() - STARTED)))
    if "--banner" in startup:
        write(b"persistent_worker.py starting\n")
    if "--persistent_worker" not in startup:
        arguments = [a for arg in startup if arg.startswith("@") for a in expand(arg)]
        sys.stderr.write(json.dumps({"pid": os.getpid(), "count": 1, "arguments": arguments}) + "\n")
        return int(option(arguments, "--exit-code") or "0")
    count = 0
    while True:
        request = read_request(protocol)
        if request is None:
            return 0
        count += 1
        answer(protocol, startup, request, count)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        os._exit(0)
