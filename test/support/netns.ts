import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import { readlink } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";

const run = promisify(execFile);

/**
 * A host of the tests' own: an HTTP server in a network namespace the test makes, joined to the host's by a
 * veth pair on a random /30 of 10.200.0.0/13. An action with a network reaches it as it would reach any
 * outside address, through the host's routing, so nothing outside this machine is ever contacted.
 */
export interface TestHost {
  /** The server's address, inside the namespace. */
  address: string;
  port: number;
  url: string;
  /** The host's end of the veth pair: one more address of the host itself. */
  hostSideAddress: string;
  /** Its processes (the namespace's holder, the server). */
  pids: number[];
  /** Requests it has answered (their paths). */
  requests(): Promise<string[]>;
  close(): Promise<void>;
}

const SERVER = `
const http = require("node:http");
const [address, port, body] = process.argv.slice(1);
http
  .createServer((request, response) => {
    process.stdout.write("request " + request.url + "\\n");
    response.end(body);
  })
  .listen(Number(port), address, () => process.stdout.write("listening\\n"));
`;

/** Starts a test host answering every HTTP request with `body` (root only: it makes a namespace and a veth pair). */
export async function startTestHost(body: string): Promise<TestHost> {
  const holder = spawn("unshare", ["--net", "--", "sleep", "infinity"], { stdio: "ignore" });
  const processes: ChildProcess[] = [holder];
  const close = async () => {
    for (const child of processes) child.kill("SIGKILL");
    await Promise.all(
      processes.map((child) =>
        child.exitCode !== null || child.signalCode !== null
          ? undefined
          : new Promise((resolve) => child.once("exit", resolve)),
      ),
    );
  };
  try {
    const namespace = await namespaceOf(holder);
    const suffix = randomBytes(3).toString("hex");
    const [hostSide, nsSide] = [`bth${suffix}`, `btn${suffix}`];
    const subnet = `10.${200 + randomInt(8)}.${randomInt(256)}.${4 * randomInt(64)}`.split(".").map(Number);
    const at = (last: number) => [...subnet.slice(0, 3), (subnet[3] ?? 0) + last].join(".");
    const [hostSideAddress, address] = [at(1), at(2)];
    await run("ip", ["link", "add", hostSide, "type", "veth", "peer", "name", nsSide, "netns", String(holder.pid)]);
    await run("ip", ["addr", "add", `${hostSideAddress}/30`, "dev", hostSide]);
    await run("ip", ["link", "set", hostSide, "up"]);
    const inside = (args: string[]) => run("nsenter", [`--net=${namespace}`, "--", ...args]);
    await inside(["ip", "addr", "add", `${address}/30`, "dev", nsSide]);
    await inside(["ip", "link", "set", nsSide, "up"]);
    await inside(["ip", "link", "set", "lo", "up"]);
    const port = 8000 + randomInt(1000);
    const server = spawn(
      "nsenter",
      [`--net=${namespace}`, "--", process.execPath, "-e", SERVER, address, String(port), body],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    processes.push(server);
    let output = "";
    await new Promise<void>((resolve, reject) => {
      server.stdout?.on("data", (chunk: Buffer) => {
        output += chunk.toString();
        if (output.includes("listening\n")) resolve();
      });
      server.once("exit", (code) => reject(new Error(`the test host's server exited (${code})`)));
    });
    return {
      address,
      port,
      url: `http://${address}:${port}/`,
      hostSideAddress,
      pids: processes.flatMap((child) => (child.pid === undefined ? [] : [child.pid])),
      requests: async () => {
        await sleep(50);
        return [...output.matchAll(/^request (.*)$/gm)].map((match) => match[1] ?? "");
      },
      // The veth pair goes with the namespace.
      close,
    };
  } catch (error) {
    await close();
    throw error;
  }
}

async function namespaceOf(holder: ChildProcess): Promise<string> {
  const own = await readlink("/proc/self/ns/net");
  for (let attempt = 0; attempt < 1000; attempt++) {
    const path = `/proc/${holder.pid}/ns/net`;
    if ((await readlink(path).catch(() => own)) !== own) return path;
    await sleep(5);
  }
  throw new Error("unshare --net made no namespace");
}
