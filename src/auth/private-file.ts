import { closeSync, constants, fstatSync, openSync, readFileSync, type Stats } from "node:fs";
import { open } from "node:fs/promises";
import { resolve } from "node:path";
import type { Config } from "../config/config.js";

/**
 * Every file holding a secret Berth reads (worker tokens, TLS private keys, the client tokens file, a
 * configuration or Docker config holding registry passwords) must be private to the user Berth runs as: a
 * regular file, not a link, owned by that user, neither readable nor writable by group or others. On the host
 * root an action sees every file its slot's uid can read, so a secret others may read is a secret every action
 * may read (and, with network access, present to the farm).
 */
export class PrivateFileError extends Error {}

/** Opens `path` itself (O_NOFOLLOW: a symlink is refused, not followed) and checks the open file, then reads it. */
export async function readPrivateFile(path: string, what: string): Promise<Buffer> {
  let handle: Awaited<ReturnType<typeof open>>;
  try {
    handle = await open(path, OPEN_FLAGS);
  } catch (err) {
    throw openError(err, path, what);
  }
  try {
    refuseUnlessPrivate(await handle.stat(), path, what);
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}

/** The same for callers that cannot wait (reading TLS files for a command line). */
export function readPrivateFileSync(path: string, what: string): Buffer {
  let fd: number;
  try {
    fd = openSync(path, OPEN_FLAGS);
  } catch (err) {
    throw openError(err, path, what);
  }
  try {
    refuseUnlessPrivate(fstatSync(fd), path, what);
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Checks a file already read some other way (e.g. a configuration found to hold passwords once parsed). */
export async function checkPrivateFile(path: string, what: string): Promise<void> {
  await readPrivateFile(path, what);
}

// O_NONBLOCK: a FIFO put in the file's place must not hang the start; it is then refused as not a regular file.
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

function openError(err: unknown, path: string, what: string): Error {
  if ((err as NodeJS.ErrnoException).code === "ELOOP") {
    return new PrivateFileError(
      `${what} ${path} is a symbolic link: name the file itself, owned by ${describeUser()} with mode 600`,
    );
  }
  return new PrivateFileError(`cannot read ${what} ${path}: ${(err as Error).message}`);
}

function refuseUnlessPrivate(info: Stats, path: string, what: string): void {
  if (!info.isFile()) throw new PrivateFileError(`${what} ${path} is not a regular file`);
  const uid = process.geteuid?.();
  if (uid !== undefined && info.uid !== uid) {
    throw new PrivateFileError(
      `${what} ${path} belongs to uid ${info.uid}, not to ${describeUser()} that Berth runs as: ` +
        `others may have read or changed it; chown ${uid} ${path} && chmod 600 ${path}`,
    );
  }
  if ((info.mode & 0o077) !== 0) {
    throw new PrivateFileError(
      `${what} ${path} is open to group or others (mode ${(info.mode & 0o777).toString(8)}), so every action on ` +
        `this host can read it; chmod 600 ${path} (and replace the secret if others may have read it)`,
    );
  }
}

function describeUser(): string {
  const uid = process.geteuid?.();
  return uid === 0 ? "root" : `uid ${uid}`;
}

/**
 * Every file holding a secret that a configuration (read from `configFile`) and a worker's command line name:
 * what a worker masks inside its sandboxes. The config file counts when it holds credentials.
 */
export function secretFilePaths(
  config: Config,
  configFile: string | undefined,
  flags: { tokenFile?: string; tlsKey?: string },
): string[] {
  const paths = [
    flags.tokenFile,
    flags.tlsKey,
    config.auth.tokensFile,
    ...config.auth.workerTokenFiles,
    config.tls?.keyFile,
    config.images.dockerConfig,
    Object.keys(config.images.credentials).length > 0 ? configFile : undefined,
  ];
  return [...new Set(paths.filter((path): path is string => path !== undefined).map((path) => resolve(path)))];
}
