import assert from "node:assert/strict";
import { test } from "node:test";
import { ReadResponse, WriteRequest } from "../gen/google/bytestream/bytestream.js";
import { decodeWriteRequest, encodeReadResponse } from "./bytestream-codec.js";

test("the fast codec agrees with the generated one byte for byte", () => {
  for (const size of [0, 1, 127, 128, 16_383, 16_384, 1024 * 1024 + 7]) {
    const data = Buffer.alloc(size, size % 251);
    assert.ok(encodeReadResponse({ data }).equals(Buffer.from(ReadResponse.encode({ data }).finish())), `read ${size}`);
    const request: WriteRequest = {
      resourceName: "uploads/u/blobs/abc/3",
      writeOffset: 2 ** 40 + size,
      finishWrite: size % 2 === 1,
      data,
    };
    const wire = Buffer.from(WriteRequest.encode(request).finish());
    assert.deepEqual(decodeWriteRequest(wire), WriteRequest.decode(wire), `write ${size}`);
  }
});

test("unknown fields are skipped, as protobuf requires", () => {
  const known = Buffer.from(
    WriteRequest.encode({ resourceName: "r", writeOffset: 5, finishWrite: true, data: Buffer.from("xy") }).finish(),
  );
  const unknown = Buffer.from([(7 << 3) | 0, 42, (8 << 3) | 2, 2, 0xaa, 0xbb]);
  assert.deepEqual(decodeWriteRequest(Buffer.concat([unknown, known])), WriteRequest.decode(known));
});
