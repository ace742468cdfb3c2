import { pino } from "pino";

export type Logger = pino.Logger;

/** JSON lines on stdout; the `msg` of each line reads on its own. */
export function createLogger(level: string): Logger {
  return pino({ level, base: { service: "berth" } });
}

/** A logger that writes nothing, for tests that do not look at logs. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
