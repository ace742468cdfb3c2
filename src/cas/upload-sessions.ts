import type { Digest } from "../digest/digest.js";
import { Code, StatusError } from "../status/status.js";
import type { BlobStore, BlobWriter } from "./blob-store.js";

/** An upload a client may resume: the bytes written so far and who is writing. */
export interface UploadSession {
  readonly writer: BlobWriter;
  /** Whether a stream is attached; a second concurrent stream is refused. */
  attached: boolean;
  timer?: NodeJS.Timeout;
}

/**
 * Uploads by resource name, kept after an interrupted stream so that
 * QueryWriteStatus can report how much was committed and a new stream can
 * go on from there. An upload left alone for the idle timeout is dropped.
 */
export class UploadSessions {
  private readonly sessions = new Map<string, UploadSession>();

  constructor(
    private readonly cas: BlobStore,
    private readonly idleTimeoutMs: number,
  ) {}

  get size(): number {
    return this.sessions.size;
  }

  committedBytes(key: string): number | undefined {
    return this.sessions.get(key)?.writer.written;
  }

  /**
   * Attaches a stream to the upload `key` at `offset`: offset 0 starts
   * afresh; any other offset must be where the kept upload stopped.
   */
  async attach(key: string, digest: Digest, offset: number): Promise<UploadSession> {
    const existing = this.sessions.get(key);
    if (existing?.attached) {
      throw new StatusError(Code.ABORTED, "another stream is already writing this upload; retry with a new upload id");
    }
    if (existing && offset === existing.writer.written) {
      clearTimeout(existing.timer);
      existing.attached = true;
      return existing;
    }
    if (offset !== 0) {
      const committed = existing?.writer.written ?? 0;
      throw new StatusError(
        Code.INVALID_ARGUMENT,
        `write_offset ${offset} does not continue the upload, which has ${committed} bytes committed (see QueryWriteStatus)`,
      );
    }
    if (existing) await this.drop(key);
    const session: UploadSession = { writer: await this.cas.createWriter(digest), attached: true };
    this.sessions.set(key, session);
    return session;
  }

  /** The stream stopped without finishing: keep what was written for a while. */
  detach(key: string, session: UploadSession): void {
    session.attached = false;
    session.timer = setTimeout(() => void this.drop(key), this.idleTimeoutMs);
    session.timer.unref();
  }

  /** The upload finished or failed for good. */
  async drop(key: string): Promise<void> {
    const session = this.sessions.get(key);
    if (!session) return;
    this.sessions.delete(key);
    clearTimeout(session.timer);
    await session.writer.abort();
  }

  forget(key: string): void {
    const session = this.sessions.get(key);
    if (session) clearTimeout(session.timer);
    this.sessions.delete(key);
  }

  async close(): Promise<void> {
    await Promise.all([...this.sessions.keys()].map((key) => this.drop(key)));
  }
}
