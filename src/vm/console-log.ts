import { createWriteStream } from "node:fs";
import { rm } from "node:fs/promises";
import { createServer } from "node:net";

export interface ConsoleLog {
  close(): Promise<void>;
}

/**
 * Listens on `socket` for QEMU's serial console and writes what it says to `file`, up to `maxBytes`: a guest's
 * root can write to its console without end, and the file is on the worker's disk. Past the cap the rest is read
 * and dropped, so that the guest never stalls on a full serial port.
 */
export async function startConsoleLog(socket: string, file: string, maxBytes: number): Promise<ConsoleLog> {
  await rm(socket, { force: true });
  const out = createWriteStream(file, { mode: 0o600 });
  let written = 0;
  let capped = false;
  const server = createServer((connection) => {
    connection.on("data", (chunk: Buffer) => {
      if (capped) return;
      const room = maxBytes - written;
      if (chunk.length <= room) {
        out.write(chunk);
        written += chunk.length;
        return;
      }
      out.write(chunk.subarray(0, room));
      out.write(`\n[berth: the console wrote more than ${maxBytes} bytes; the rest was dropped]\n`);
      written = maxBytes;
      capped = true;
    });
    connection.on("error", () => {});
  });
  server.maxConnections = 1;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socket, resolve);
  });
  let closing: Promise<void> | undefined;
  return {
    close() {
      closing ??= (async () => {
        await new Promise<void>((resolve) => server.close(() => resolve()));
        await new Promise<void>((resolve) => out.end(resolve));
        await rm(socket, { force: true });
      })();
      return closing;
    },
  };
}
