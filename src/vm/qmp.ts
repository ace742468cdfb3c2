import { createConnection, type Socket } from "node:net";
import { createInterface } from "node:readline";

interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
  event?: string;
  QMP?: unknown;
}

/** A QEMU Machine Protocol client on a unix socket: one command at a time, events ignored. */
export class QmpClient {
  private waiting: Array<{ resolve(reply: QmpReply): void; reject(error: Error): void }> = [];

  private constructor(private readonly socket: Socket) {
    createInterface({ input: socket }).on("line", (line) => {
      let reply: QmpReply;
      try {
        reply = JSON.parse(line);
      } catch {
        return;
      }
      if (reply.event !== undefined) return;
      this.waiting.shift()?.resolve(reply);
    });
    socket.on("close", () => {
      for (const waiter of this.waiting.splice(0)) waiter.reject(new Error("QEMU closed its QMP socket"));
    });
  }

  static async connect(path: string): Promise<QmpClient> {
    const socket = createConnection(path);
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const client = new QmpClient(socket);
    await client.next(); // the greeting
    await client.execute("qmp_capabilities");
    return client;
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const { return: value, error } = await reply;
    if (error) throw new Error(`QEMU refused ${command}: ${error.desc}`);
    return value;
  }

  close(): void {
    this.socket.destroy();
  }

  private next(): Promise<QmpReply> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
    });
  }
}
