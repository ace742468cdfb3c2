/**
 * A plain HTTP file server in a process of its own, as a release mirror is: GET /NAME sends the file NAME of
 * one directory with its Content-Length, and counts the requests it answered (GET /_served, not a file name).
 * The asset benchmark's FetchBlob and curl both download from it, so neither shares a process with the origin.
 */
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";
import { type ServerProcess, spawnListening } from "../test/support/farm.js";

const SERVED_PATH = "/_served";

function serve(dir: string): void {
  let served = 0;
  const server = createServer((request, response) => {
    const path = request.url ?? "";
    if (path === SERVED_PATH) {
      response.end(String(served));
      return;
    }
    // One level, no traversal: the name is the last segment of the path.
    const file = join(dir, basename(path));
    stat(file).then(
      (stats) => {
        served++;
        response.writeHead(200, { "content-type": "application/octet-stream", "content-length": stats.size });
        createReadStream(file, { highWaterMark: 1024 * 1024 }).pipe(response);
      },
      () => {
        response.writeHead(404).end();
      },
    );
  });
  server.listen(0, "127.0.0.1", () => {
    const { port } = server.address() as AddressInfo;
    process.stdout.write(`file origin listening on 127.0.0.1:${port}\n`);
  });
  process.once("SIGTERM", () => {
    server.closeAllConnections();
    server.close(() => process.exit(0));
  });
}

export interface FileOrigin {
  /** http://127.0.0.1:PORT */
  readonly origin: string;
  /** The files it sent so far. */
  served(): Promise<number>;
  stop(): Promise<number | null>;
}

export async function spawnFileOrigin(dir: string): Promise<FileOrigin> {
  const child: ServerProcess = await spawnListening(
    [fileURLToPath(import.meta.url), "serve", dir],
    /file origin listening on (\S+)/,
    "the file origin",
  );
  const origin = `http://${child.address}`;
  return {
    origin,
    served: async () => Number(await (await fetch(`${origin}${SERVED_PATH}`)).text()),
    stop: () => child.stop(),
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url) && process.argv[2] === "serve" && process.argv[3]) {
  serve(process.argv[3]);
}
