/**
 * The framed protocol between the worker and berth-agent in the guest (src/vm/guest/agent.c has the same
 * description; keep the two in step).
 *
 *   frame = length:u32 big-endian (bytes after this field, 1..MAX_FRAME_BYTES) type:u8 payload
 *
 * Host to guest: 'R' run (NUL-ended fields: uid, gid, cwd, argc, argv…, envc, env…), 'S' setup (the same, run in
 * the agent's own root, the initramfs with busybox, rather than the action's: the worker's own steps), 'M' mount
 * (tag, target, then mode uid gid path per directory: the 9p share `tag` at ROOT/target, those directories' ids
 * and modes; answered by an empty 'M' or an 'F'), 'K' kill (signal number
 * in decimal, sent to the running command's process group), 'P' ping (echoed back), 'T' time ("<seconds>
 * <nanoseconds>" since the epoch: the guest's clock is set to it, since a resumed VM wakes at its snapshot's time).
 * Guest to host: 'H' hello (kernel release, once at start), 'O'/'E' stdout/stderr chunks, 'X' exit
 * ("<code> <signal>"; code -1 when a signal ended it), 'F' failure to start (a message; no 'X' follows),
 * 'P' pong.
 */

export const MAX_FRAME_BYTES = 1 << 20;

export const FrameType = {
  run: "R",
  setup: "S",
  mount: "M",
  kill: "K",
  ping: "P",
  time: "T",
  hello: "H",
  stdout: "O",
  stderr: "E",
  exit: "X",
  failure: "F",
} as const;

export interface Frame {
  type: string;
  payload: Buffer;
}

export interface GuestCommand {
  argv: string[];
  /** The command's whole environment; PATH in it is where argv[0] is looked up. */
  env: Record<string, string>;
  /** Absolute, in the guest's root. */
  workingDirectory: string;
  uid: number;
  gid: number;
}

export function encodeFrame(type: string, payload: Buffer | string = Buffer.alloc(0)): Buffer {
  const body = typeof payload === "string" ? Buffer.from(payload) : payload;
  if (body.length + 1 > MAX_FRAME_BYTES) {
    throw new Error(`an agent frame holds at most ${MAX_FRAME_BYTES} bytes; this one has ${body.length + 1}`);
  }
  const header = Buffer.alloc(5);
  header.writeUInt32BE(body.length + 1, 0);
  header.write(type, 4, "latin1");
  return Buffer.concat([header, body]);
}

/**
 * The 'R' payload ('S' with `inAgentRoot`: for the worker's own setup); a NUL inside any string would shift every
 * later field, so it is refused.
 */
export function encodeRun(command: GuestCommand, inAgentRoot = false): Buffer {
  const env = Object.entries(command.env).map(([name, value]) => `${name}=${value}`);
  const fields = [
    String(command.uid),
    String(command.gid),
    command.workingDirectory,
    String(command.argv.length),
    ...command.argv,
    String(env.length),
    ...env,
  ];
  for (const field of fields) {
    if (field.includes("\0")) throw new Error(`a command's argument, variable or directory holds a NUL: ${field}`);
  }
  return encodeFrame(inAgentRoot ? FrameType.setup : FrameType.run, fields.map((field) => `${field}\0`).join(""));
}

/** Cuts a byte stream into frames; throws on a length outside 1..MAX_FRAME_BYTES. */
export class FrameReader {
  private buffered: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Frame[] {
    this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk]);
    const frames: Frame[] = [];
    while (this.buffered.length >= 5) {
      const length = this.buffered.readUInt32BE(0);
      if (length < 1 || length > MAX_FRAME_BYTES) throw new Error(`agent sent a frame of ${length} bytes`);
      if (this.buffered.length < 4 + length) break;
      frames.push({
        type: this.buffered.toString("latin1", 4, 5),
        payload: this.buffered.subarray(5, 4 + length),
      });
      this.buffered = this.buffered.subarray(4 + length);
    }
    return frames;
  }
}

/** A directory of the action's root given its image's mode and ids (see UpperDirectory). */
export interface GuestDirectoryMode {
  path: string;
  mode: number;
  uid: number;
  gid: number;
}

/** The 'M' payload: mount the share `tag` at `target` (in the action's root), then set the directories' modes. */
export function encodeMount(tag: string, target: string, directories: readonly GuestDirectoryMode[]): Buffer {
  const fields = [
    tag,
    target,
    ...directories.flatMap((d) => [(d.mode & 0o7777).toString(8), String(d.uid), String(d.gid), d.path]),
  ];
  for (const field of fields) {
    if (field.includes("\0")) throw new Error(`a mount request's field holds a NUL: ${field}`);
  }
  return encodeFrame(FrameType.mount, fields.map((field) => `${field}\0`).join(""));
}
