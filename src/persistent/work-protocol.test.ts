import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { WorkRequest, WorkResponse } from "../gen/blaze/worker/worker_protocol.js";
import { encodeWorkRequest, WorkProtocolError, workResponseReader } from "./work-protocol.js";

const request = WorkRequest.fromPartial({
  arguments: ["-o", "out.txt", "ünïcode"],
  inputs: [{ path: "pkg/a.txt", digest: Buffer.from("ab".repeat(32)) }],
});

function delimited(response: Partial<WorkResponse>): Buffer {
  const body = Buffer.from(WorkResponse.encode(WorkResponse.fromPartial(response)).finish());
  const length: number[] = [];
  for (let rest = body.length; ; rest = Math.floor(rest / 128)) {
    if (rest < 128) {
      length.push(rest);
      break;
    }
    length.push((rest % 128) | 0x80);
  }
  return Buffer.concat([Buffer.from(length), body]);
}

/** Feeds `bytes` one byte at a time, as the slowest pipe would. */
function byteByByte(protocol: "json" | "proto", bytes: Buffer, maxBytes?: number): WorkResponse[] {
  const reader = workResponseReader(protocol, maxBytes);
  const responses: WorkResponse[] = [];
  for (let i = 0; i < bytes.length; i++) responses.push(...reader.push(bytes.subarray(i, i + 1)));
  return responses;
}

describe("the json framing", () => {
  test("writes a request as one line of proto3 JSON: camelCase, bytes in base64, defaults left out", () => {
    const line = encodeWorkRequest("json", request).toString();
    assert.ok(line.endsWith("\n") && !line.slice(0, -1).includes("\n"));
    assert.deepEqual(JSON.parse(line), {
      arguments: ["-o", "out.txt", "ünïcode"],
      inputs: [{ path: "pkg/a.txt", digest: Buffer.from("ab".repeat(32)).toString("base64") }],
    });
  });

  test("reads responses split anywhere, several in one chunk, one over several lines, in either field spelling", () => {
    const text =
      '{"exitCode":1,"output":"a } { \\" brace"}\n' +
      '{"exit_code": "-2", "output": "ü", "unknownField": {"x": [1, {"y": "}"}]}}\n' +
      '{\n  "output": "pretty"\n}\n';
    const expected = [
      { exitCode: 1, output: 'a } { " brace', requestId: 0, wasCancelled: false },
      { exitCode: -2, output: "ü", requestId: 0, wasCancelled: false },
      { exitCode: 0, output: "pretty", requestId: 0, wasCancelled: false },
    ];
    assert.deepEqual(byteByByte("json", Buffer.from(text)), expected);
    assert.deepEqual(workResponseReader("json").push(Buffer.from(text)), expected);
  });

  test("refuses what is not a JSON object, invalid JSON and fields of the wrong type", () => {
    for (const [text, message] of [
      ["Compiling foo.java...\n", /something other than a JSON WorkResponse: "Compiling foo/],
      ['{"exitCode": 1,,}\n', /invalid JSON/],
      ['{"exitCode": "one"}\n', /exitCode "one", not an int32/],
      ['{"exitCode": 4294967296}\n', /not an int32/],
      ['{"output": 5}\n', /output 5, not a string/],
    ] as const) {
      assert.throws(
        () => workResponseReader("json").push(Buffer.from(text)),
        (err: Error) => {
          assert.ok(err instanceof WorkProtocolError);
          assert.match(err.message, message);
          return true;
        },
      );
    }
  });

  test("refuses a response past the cap while it is still arriving", () => {
    const reader = workResponseReader("json", 1000);
    reader.push(Buffer.from('{"output":"'));
    const chunk = Buffer.alloc(600, "x");
    reader.push(chunk);
    assert.equal(reader.pendingBytes, 611);
    assert.throws(() => reader.push(chunk), /at most 1000 bytes are accepted/);
  });
});

describe("the proto framing", () => {
  test("writes a request as a varint length and the message", () => {
    const bytes = encodeWorkRequest("proto", request);
    const body = WorkRequest.encode(request).finish();
    assert.equal(bytes[0], body.length);
    assert.deepEqual(WorkRequest.decode(bytes.subarray(1)), request);
    // Lengths of 128 bytes and more take a second varint byte.
    const large = encodeWorkRequest("proto", WorkRequest.fromPartial({ arguments: ["x".repeat(300)] }));
    assert.deepEqual([large[0], large[1]], [((large.length - 2) % 128) | 0x80, Math.floor((large.length - 2) / 128)]);
  });

  test("reads responses split anywhere and several in one chunk, negative exit codes included", () => {
    const bytes = Buffer.concat([
      delimited({ exitCode: 1, output: "first" }),
      delimited({}),
      delimited({ exitCode: -1, output: "ü".repeat(100) }),
    ]);
    const expected = [
      { exitCode: 1, output: "first", requestId: 0, wasCancelled: false },
      { exitCode: 0, output: "", requestId: 0, wasCancelled: false },
      { exitCode: -1, output: "ü".repeat(100), requestId: 0, wasCancelled: false },
    ];
    assert.deepEqual(byteByByte("proto", bytes), expected);
    assert.deepEqual(workResponseReader("proto").push(bytes), expected);
  });

  test("refuses a length past the cap from the length alone, before any of the message", () => {
    const reader = workResponseReader("proto", 1000);
    assert.throws(() => reader.push(Buffer.from([0xe9, 0x07])), /1001 bytes \(its length prefix\); at most 1000/);
    // A varint that never ends.
    assert.throws(() => workResponseReader("proto").push(Buffer.alloc(6, 0xff)), /more than 2\^28 bytes/);
  });

  test("refuses bytes that are not a WorkResponse", () => {
    assert.throws(
      () => workResponseReader("proto").push(Buffer.from([5, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f])),
      (err: Error) => err instanceof WorkProtocolError && /5 bytes that are not a WorkResponse/.test(err.message),
    );
  });
});
