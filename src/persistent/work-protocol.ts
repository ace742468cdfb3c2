/**
 * The two encodings of Bazel's persistent worker protocol on a byte stream:
 * `proto`, each message preceded by its length as a varint (protobuf's
 * writeDelimitedTo), and `json`, the proto3 JSON mapping of each message, one
 * object per line. Requests are written whole; responses arrive in pieces of
 * any size and are taken apart here, never holding more than the cap of one
 * message, whatever the process writes.
 */
import { WorkRequest, WorkResponse } from "../gen/blaze/worker/worker_protocol.js";

export type WorkProtocol = "json" | "proto";

/** The largest response accepted unless told: compiler messages, not outputs (those go to files). */
export const DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024;

/** The worker process broke the protocol: garbage, an oversized message, a response of the wrong shape. */
export class WorkProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "WorkProtocolError";
  }
}

export function encodeWorkRequest(protocol: WorkProtocol, request: WorkRequest): Buffer {
  if (protocol === "json") return Buffer.from(`${JSON.stringify(WorkRequest.toJSON(request))}\n`);
  const body = WorkRequest.encode(request).finish();
  return Buffer.concat([encodeVarint(body.byteLength), body]);
}

function encodeVarint(value: number): Buffer {
  const bytes: number[] = [];
  let rest = value;
  while (rest >= 0x80) {
    bytes.push((rest % 0x80) | 0x80);
    rest = Math.floor(rest / 0x80);
  }
  bytes.push(rest);
  return Buffer.from(bytes);
}

/** Takes the process's stdout apart into responses, as it arrives. */
export interface WorkResponseReader {
  /** The responses completed by `chunk`, in order; throws WorkProtocolError at the first garbage. */
  push(chunk: Buffer): WorkResponse[];
  /** Bytes of a response begun and not finished (a process that exits now cut it short). */
  readonly pendingBytes: number;
}

export function workResponseReader(protocol: WorkProtocol, maxBytes = DEFAULT_MAX_RESPONSE_BYTES): WorkResponseReader {
  return protocol === "json" ? new JsonResponseReader(maxBytes) : new ProtoResponseReader(maxBytes);
}

function tooLarge(maxBytes: number, seen: string): WorkProtocolError {
  return new WorkProtocolError(
    `the worker process wrote a WorkResponse of ${seen}; at most ${maxBytes} bytes are accepted`,
  );
}

/** Varint length, then that many bytes of WorkResponse. */
class ProtoResponseReader implements WorkResponseReader {
  private header: number[] = [];
  private bodyLength: number | undefined;
  private body: Buffer[] = [];
  private bodyBytes = 0;

  constructor(private readonly maxBytes: number) {}

  get pendingBytes(): number {
    return this.header.length + this.bodyBytes;
  }

  push(chunk: Buffer): WorkResponse[] {
    const responses: WorkResponse[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.bodyLength === undefined) {
        const byte = chunk[at++] as number;
        this.header.push(byte);
        if (byte & 0x80) {
          // Ten bytes hold any 64-bit varint; past five the length is beyond any cap anyway.
          if (this.header.length >= 5) throw tooLarge(this.maxBytes, "more than 2^28 bytes (its length prefix)");
          continue;
        }
        const length = this.header.reduceRight((sum, b) => sum * 0x80 + (b & 0x7f), 0);
        this.header = [];
        if (length > this.maxBytes) throw tooLarge(this.maxBytes, `${length} bytes (its length prefix)`);
        this.bodyLength = length;
      }
      const take = Math.min(this.bodyLength - this.bodyBytes, chunk.length - at);
      if (take > 0) {
        this.body.push(chunk.subarray(at, at + take));
        this.bodyBytes += take;
        at += take;
      }
      if (this.bodyBytes === this.bodyLength) {
        responses.push(decodeProto(Buffer.concat(this.body)));
        this.body = [];
        this.bodyBytes = 0;
        this.bodyLength = undefined;
      }
    }
    return responses;
  }
}

function decodeProto(bytes: Buffer): WorkResponse {
  try {
    return WorkResponse.decode(bytes);
  } catch (err) {
    throw new WorkProtocolError(
      `the worker process wrote ${bytes.length} bytes that are not a WorkResponse (${(err as Error).message}): ${shown(bytes)}`,
    );
  }
}

const OPEN_BRACE = 0x7b;
const CLOSE_BRACE = 0x7d;
const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const WHITESPACE = new Set([0x20, 0x09, 0x0a, 0x0d]);

/**
 * JSON objects, one after another. Bazel writes one per line; the end of an
 * object is found by its braces (outside strings), so that a worker that
 * pretty-prints its responses over several lines is read as Bazel reads it.
 */
class JsonResponseReader implements WorkResponseReader {
  private parts: Buffer[] = [];
  private bytes = 0;
  private depth = 0;
  private inString = false;
  private escaped = false;

  constructor(private readonly maxBytes: number) {}

  get pendingBytes(): number {
    return this.bytes;
  }

  push(chunk: Buffer): WorkResponse[] {
    const responses: WorkResponse[] = [];
    let start = 0;
    for (let at = 0; at < chunk.length; at++) {
      const byte = chunk[at] as number;
      if (this.depth === 0) {
        if (WHITESPACE.has(byte)) {
          start = at + 1;
          continue;
        }
        if (byte !== OPEN_BRACE) {
          throw new WorkProtocolError(
            `the worker process wrote something other than a JSON WorkResponse: ${shown(chunk.subarray(at))}`,
          );
        }
        start = at;
        this.depth = 1;
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (byte === BACKSLASH) this.escaped = true;
        else if (byte === QUOTE) this.inString = false;
      } else if (byte === QUOTE) this.inString = true;
      else if (byte === OPEN_BRACE) this.depth++;
      else if (byte === CLOSE_BRACE && --this.depth === 0) {
        this.append(chunk.subarray(start, at + 1));
        responses.push(parseJsonResponse(Buffer.concat(this.parts)));
        this.parts = [];
        this.bytes = 0;
        start = at + 1;
      }
    }
    if (this.depth > 0) this.append(chunk.subarray(start));
    return responses;
  }

  private append(part: Buffer): void {
    this.bytes += part.length;
    if (this.bytes > this.maxBytes) throw tooLarge(this.maxBytes, `more than ${this.maxBytes} bytes (unfinished)`);
    this.parts.push(part);
  }
}

/** proto3's JSON mapping: lowerCamelCase names (the proto names accepted too), int32 as a number or a string. */
function parseJsonResponse(bytes: Buffer): WorkResponse {
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString("utf8"));
  } catch (err) {
    throw new WorkProtocolError(`the worker process wrote invalid JSON (${(err as Error).message}): ${shown(bytes)}`);
  }
  const object = value as Record<string, unknown>;
  const field = (camel: string, snake: string): unknown => object[camel] ?? object[snake];
  return {
    exitCode: int32(field("exitCode", "exit_code"), "exitCode"),
    output: typed(field("output", "output"), "string", "output", ""),
    requestId: int32(field("requestId", "request_id"), "requestId"),
    wasCancelled: typed(field("wasCancelled", "was_cancelled"), "boolean", "wasCancelled", false),
  };
}

function typed<T>(value: unknown, type: "string" | "boolean", name: string, fallback: T): T {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== type) {
    throw new WorkProtocolError(`the worker process's WorkResponse has ${name} ${shown(value)}, not a ${type}`);
  }
  return value as T;
}

function int32(value: unknown, name: string): number {
  if (value === undefined || value === null) return 0;
  const number = typeof value === "string" && /^-?[0-9]+$/.test(value) ? Number(value) : value;
  if (typeof number !== "number" || !Number.isInteger(number) || number < -(2 ** 31) || number >= 2 ** 31) {
    throw new WorkProtocolError(`the worker process's WorkResponse has ${name} ${shown(value)}, not an int32`);
  }
  return number;
}

/** A short, printable excerpt of what the process wrote, for the error message. */
function shown(value: unknown): string {
  const text = Buffer.isBuffer(value)
    ? JSON.stringify(value.subarray(0, 101).toString("utf8"))
    : String(JSON.stringify(value));
  return text.length > 100 ? `${text.slice(0, 100)}…` : text;
}
