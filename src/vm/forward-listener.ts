/**
 * Run by the worker inside a VM's network namespace (nsenter --net=…): listens on 127.0.0.1 at each port of its
 * arguments, hands every listening socket to the worker over the IPC channel, and exits. The sockets stay in the
 * namespace they were made in, where QEMU's user-mode network takes the guest's connections to its gateway; the
 * worker, in the host's namespace, accepts them (see registry-forwards.ts).
 */
import { createServer, type Server } from "node:net";

async function main(): Promise<void> {
  const send = process.send?.bind(process);
  if (!send) throw new Error("forward-listener runs only as the worker's child, with an IPC channel");
  const ports = process.argv.slice(2).map((arg) => Number.parseInt(arg, 10));
  for (const port of ports) {
    const server: Server = createServer({ pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host: "127.0.0.1", port, exclusive: true }, resolve);
    });
    await new Promise<void>((resolve, reject) =>
      send({ port }, server, {}, (error: Error | null) => (error ? reject(error) : resolve())),
    );
    // The worker holds its own copy of the socket from here on.
    server.close();
  }
  process.disconnect?.();
}

main().catch((error: unknown) => {
  process.stderr.write(`forward-listener: ${(error as Error).message}\n`);
  process.exit(1);
});
