import { createServer, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

/** What a route of the origin does with a GET. */
export type Route =
  | { kind: "file"; body: Buffer; chunked?: boolean }
  | { kind: "redirect"; location: string; status?: number }
  | { kind: "status"; status: number }
  /** Sends the headers (and `first` bytes of body, if any) and then nothing, until the test closes the origin. */
  | { kind: "hang"; first?: Buffer; length?: number }
  /** Accepts the request and never answers it. */
  | { kind: "silent" }
  /** Answers `body` after `delayMs`. */
  | { kind: "slow"; body: Buffer; delayMs: number }
  /** Streams `bytes` bytes of zeros without a Content-Length, as fast as the client reads. */
  | { kind: "endless"; bytes: number };

/** A real HTTP server on a loopback port, serving the routes a test sets, remembering what it was asked. */
export interface HttpOrigin {
  /** http://127.0.0.1:PORT */
  readonly url: string;
  readonly port: number;
  readonly routes: Map<string, Route>;
  /** Requests received, by path. */
  hits(path: string): number;
  /** Headers of the last request for `path`. */
  lastHeaders(path: string): IncomingHttpHeaders | undefined;
  close(): Promise<void>;
}

export async function startHttpOrigin(host = "127.0.0.1"): Promise<HttpOrigin> {
  const routes = new Map<string, Route>();
  const hits = new Map<string, number>();
  const headers = new Map<string, IncomingHttpHeaders>();
  const open = new Set<ServerResponse>();
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = new URL(req.url ?? "/", "http://x").pathname;
    hits.set(path, (hits.get(path) ?? 0) + 1);
    headers.set(path, req.headers);
    const route = routes.get(path);
    if (!route) {
      res.writeHead(404).end("not found");
      return;
    }
    switch (route.kind) {
      case "file":
        if (route.chunked) {
          res.writeHead(200, { "content-type": "application/octet-stream" });
          for (let i = 0; i < route.body.byteLength; i += 65536) res.write(route.body.subarray(i, i + 65536));
          res.end();
        } else {
          res.writeHead(200, { "content-length": route.body.byteLength }).end(route.body);
        }
        return;
      case "redirect":
        res.writeHead(route.status ?? 302, { location: route.location }).end();
        return;
      case "status":
        res.writeHead(route.status).end();
        return;
      case "hang":
        open.add(res);
        res.writeHead(200, route.length === undefined ? {} : { "content-length": route.length });
        if (route.first) res.write(route.first);
        return;
      case "silent":
        open.add(res);
        return;
      case "slow": {
        open.add(res);
        const timer = setTimeout(
          () => res.writeHead(200, { "content-length": route.body.byteLength }).end(route.body),
          route.delayMs,
        );
        res.on("close", () => clearTimeout(timer));
        return;
      }
      case "endless": {
        res.writeHead(200);
        const chunk = Buffer.alloc(65536);
        let sent = 0;
        const pump = () => {
          while (sent < route.bytes) {
            sent += chunk.byteLength;
            if (!res.write(chunk)) return void res.once("drain", pump);
          }
          res.end();
        };
        res.on("error", () => {});
        pump();
        return;
      }
    }
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const { port } = server.address() as AddressInfo;
  const shown = host.includes(":") ? `[${host}]` : host;
  return {
    url: `http://${shown}:${port}`,
    port,
    routes,
    hits: (path) => hits.get(path) ?? 0,
    lastHeaders: (path) => headers.get(path),
    close: async () => {
      for (const res of open) res.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
