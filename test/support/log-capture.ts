import { pino } from "pino";
import type { Logger } from "../../src/log/log.js";

/** One JSON line the farm logged, parsed. */
export interface LogRecord {
  readonly level: number;
  readonly msg: string;
  readonly [field: string]: unknown;
}

/** pino's numeric levels. */
export const LEVEL = { trace: 10, debug: 20, info: 30, warn: 40, error: 50 } as const;

/** A logger whose every line is kept, for tests that read what an operator would. */
export interface CapturedLog {
  /** Pass as startTestFarm's `log`. */
  readonly log: Logger;
  /** Every line as written (search these for secrets). */
  readonly lines: readonly string[];
  readonly records: readonly LogRecord[];
  /** Records written after the first `from` ones (take `records.length` before a call). */
  since(from: number): LogRecord[];
}

export function captureLog(level: keyof typeof LEVEL = "trace"): CapturedLog {
  const lines: string[] = [];
  const records: LogRecord[] = [];
  // pino writes each record with one synchronous write() call.
  const log = pino(
    { level, base: { service: "berth" } },
    {
      write(line: string) {
        lines.push(line);
        records.push(JSON.parse(line) as LogRecord);
      },
    },
  );
  return { log, lines, records, since: (from) => records.slice(from) };
}
