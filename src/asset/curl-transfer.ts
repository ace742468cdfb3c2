import type { ChildProcess } from "node:child_process";
import { UriFailure } from "./uri-failure.js";

/** One GET, exactly as the policy allowed it: where to connect, what to send, where the body goes. */
export interface CurlRequest {
  readonly url: URL;
  /** The addresses the policy checked for the URL's host name (undefined for an IP literal): curl connects to these only. */
  readonly addresses: readonly string[] | undefined;
  /** Sent as they are (a client's credentials): on curl's standard input, never on its command line. */
  readonly headers: Readonly<Record<string, string>>;
  /** The body is written here: a new name in the farm's temporary directory (0700), which curl creates. */
  readonly outputPath: string;
  /** The body may not be longer: curl refuses a longer Content-Length (the launcher's prlimit stops the file growing past it). */
  readonly maxBytes: number;
  /** curl's own deadline, a backstop behind the caller's signal. */
  readonly maxTimeMs: number;
}

/** The status line and headers of the final answer (after any 1xx), names in lowercase. */
export interface ResponseHead {
  readonly status: number;
  readonly statusText: string;
  readonly headers: ReadonlyMap<string, string>;
}

/** How much of curl's header dump is read at most (curl itself refuses header blocks over 100 KiB). */
const MAX_HEAD_BYTES = 256 * 1024;
/** How much of curl's error output is kept for the message. */
const MAX_STDERR_BYTES = 4096;

/**
 * One HTTP GET run by curl (Debian's, on PATH) in a process of its own
 * (started by a CurlLauncher),
 * the body written by curl straight into a file: no byte of it passes
 * through the event loop. Every choice that matters is fixed here and given
 * on curl's standard input as a config file (`-K -`), so that neither the
 * URL (pre-signed ones carry their signature in the query) nor the headers
 * show in /proc/PID/cmdline: no ~/.curlrc (`-q`) or .netrc, no proxy from the
 * environment, only http and https, no redirect followed (the caller
 * follows them, checking each with the policy), the connection pinned to
 * the addresses the policy checked (`--resolve`), and under `prlimit
 * --fsize` so that the file cannot grow past the limit even for a body of
 * unknown length.
 */
export class CurlTransfer {
  /** Resolves with the final answer's head as soon as curl has it; rejects when curl fails first. */
  readonly head: Promise<ResponseHead>;
  /** Resolves when curl wrote the whole body and exited; rejects with a UriFailure saying why it did not. */
  readonly done: Promise<void>;
  private exited = false;

  private constructor(
    private readonly child: ChildProcess,
    request: CurlRequest,
  ) {
    let headText = "";
    let stderr = "";
    let resolveHead: (head: ResponseHead) => void = () => {};
    let rejectHead: (err: unknown) => void = () => {};
    this.head = new Promise<ResponseHead>((resolve, reject) => {
      resolveHead = resolve;
      rejectHead = reject;
    });
    this.head.catch(() => {}); // a caller that waits only for `done` still hears of the failure there
    let headSeen = false;
    child.stdout?.setEncoding("latin1");
    child.stdout?.on("data", (text: string) => {
      if (headSeen) return;
      headText += text;
      const head = finalHead(headText);
      if (head) {
        headSeen = true;
        resolveHead(head);
      } else if (headText.length > MAX_HEAD_BYTES) {
        headSeen = true;
        rejectHead(new UriFailure(`its response headers are longer than ${MAX_HEAD_BYTES} bytes`));
        this.kill();
      }
    });
    child.stderr?.setEncoding("utf8");
    child.stderr?.on("data", (text: string) => {
      if (stderr.length < MAX_STDERR_BYTES) stderr += text;
    });
    this.done = new Promise<void>((resolve, reject) => {
      child.on("error", (err) => {
        this.exited = true;
        const failure = new UriFailure(`curl could not be started (${err.message}); is it installed?`);
        rejectHead(failure);
        reject(failure);
      });
      child.on("close", (code, signal) => {
        this.exited = true;
        if (code === 0) {
          if (!headSeen) rejectHead(new UriFailure("curl ended without a response"));
          return resolve();
        }
        const failure = curlFailure(code, signal, stderr, request.maxBytes, headText);
        rejectHead(failure);
        reject(failure);
      });
    });
    this.done.catch(() => {});
  }

  /** Gives `child` (a CurlLauncher's, waiting on its standard input) the request. */
  static start(child: ChildProcess, request: CurlRequest): CurlTransfer {
    const transfer = new CurlTransfer(child, request);
    child.stdin?.end(curlConfig(request));
    return transfer;
  }

  /** Whether curl is still running. */
  get running(): boolean {
    return !this.exited;
  }

  /** Stops curl at once (a timeout, a refusal, an answer that is not wanted). */
  kill(): void {
    if (!this.exited) this.child.kill("SIGKILL");
  }
}

/** curl's config file syntax: a double-quoted string, backslash and quote escaped. */
function quoted(value: string): string {
  return `"${value.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

function curlConfig(request: CurlRequest): string {
  const { url } = request;
  const lines = [
    `url = ${quoted(url.href)}`,
    `output = ${quoted(request.outputPath)}`,
    // The head goes to stdout as it arrives (the caller decides on it before the body is in).
    'dump-header = "-"',
    "silent",
    "show-error",
    `proto = ${quoted(`=${url.protocol.slice(0, -1)}`)}`,
    "max-redirs = 0",
    'noproxy = "*"',
    `max-filesize = ${request.maxBytes}`,
    `max-time = ${Math.max(1, Math.ceil(request.maxTimeMs / 1000))}`,
    'user-agent = "berth-remote-asset"',
  ];
  if (request.addresses) {
    const port = url.port || (url.protocol === "https:" ? "443" : "80");
    const addresses = request.addresses.map((a) => (a.includes(":") ? `[${a}]` : a)).join(",");
    lines.push(`resolve = ${quoted(`${url.hostname}:${port}:${addresses}`)}`);
  }
  // Names and values were checked (no line break, no NUL) when the qualifiers were read. For curl, "Name:" with
  // nothing after it removes a header; "Name;" is how an empty one is sent.
  for (const [name, value] of Object.entries(request.headers)) {
    lines.push(`header = ${quoted(value.trim() === "" ? `${name};` : `${name}: ${value}`)}`);
  }
  return `${lines.join("\n")}\n`;
}

/** The last complete head block of curl's header dump, skipping 1xx interim answers; undefined until it is complete. */
function finalHead(text: string): ResponseHead | undefined {
  let rest = text;
  for (;;) {
    const end = rest.indexOf("\r\n\r\n");
    if (end === -1) return undefined;
    const lines = rest.slice(0, end).split("\r\n");
    rest = rest.slice(end + 4);
    const statusLine = /^HTTP\/[0-9.]+ ([0-9]{3}) ?(.*)$/.exec(lines[0] ?? "");
    if (!statusLine) continue;
    const status = Number(statusLine[1]);
    if (status >= 100 && status < 200) continue;
    const headers = new Map<string, string>();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    return { status, statusText: statusLine[2] ?? "", headers };
  }
}

/** Why curl failed, in words a person can act on (curl's own message, its exit code named). */
function curlFailure(
  code: number | null,
  signal: NodeJS.Signals | null,
  stderr: string,
  maxBytes: number,
  headText: string,
): UriFailure {
  if (signal === "SIGXFSZ") return new UriFailure(`it sent more than asset.fetch.maxBlobBytes (${maxBytes} bytes)`);
  if (signal) return new UriFailure(`the download was stopped (${signal})`);
  const said =
    stderr
      .split("\n")
      .map((line) => line.replace(/^curl: \([0-9]+\) /, "").trim())
      .find((line) => line !== "") ?? "";
  switch (code) {
    case 28:
      return new UriFailure("the fetch's timeout passed", "timedOut");
    case 63: {
      // curl stops at the Content-Length header, before the head is complete.
      const announced = /^content-length:\s*([0-9]+)\s*$/im.exec(headText)?.[1];
      return new UriFailure(
        announced === undefined
          ? `it announced more than asset.fetch.maxBlobBytes (${maxBytes} bytes)`
          : `its ${announced} bytes are more than asset.fetch.maxBlobBytes (${maxBytes})`,
      );
    }
    default:
      return new UriFailure(`${said || "the download failed"} (curl exit code ${code})`);
  }
}
