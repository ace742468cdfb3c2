import type { Timestamp } from "../gen/google/protobuf/timestamp.js";

export function toTimestamp(date: Date): Timestamp {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

export function nowTimestamp(): Timestamp {
  return toTimestamp(new Date());
}
